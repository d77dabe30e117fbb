"""Tasks: passkey retrieval, synthetic copying and BABILong, each scored by greedy decoding.

Start with :func:`statelens.tasks.decode.greedy_continue` (a prompt of any length is rolled out in
chunks, then tokens are decoded one at a time from the carried state); each task lives in its own
module, builds its prompts deterministically from a seed and returns a tidy DataFrame.
Tasks are registered by name in :data:`tasks`.
"""
from statelens.registry import Registry

tasks: Registry = Registry("task")

from statelens.tasks import passkey, copying, babilong  # noqa: E402,F401,I001  (registration order = the report's)
