"""``statelens perplexity``: loss and perplexity by position, far past the training length."""
from __future__ import annotations

from statelens.cli.options import (Backend, BackendName, BucketScale, Buckets, Chunk, Ckpt, Data, Device, DType,
                                   Dtype, Group, Length, MitigationSpec, NumSeqs, Out, Resume, Scale, Seed, TrainLen)
from statelens.cli.options import TextField, TokenizerOpt


def perplexity(
    ckpt: Ckpt,
    data: Data = None,
    train_len: TrainLen = None,
    length: Length = None,
    num_seqs: NumSeqs = 8,
    buckets: Buckets = 32,
    scale: BucketScale = Scale.log,
    chunk: Chunk = 2048,
    group: Group = 1,
    resume: Resume = False,
    device: Device = "cpu",
    backend: Backend = BackendName.auto,
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
    out: Out = None,
    mitigation: MitigationSpec = None,
    tokenizer: TokenizerOpt = None,
    text_field: TextField = "text",
) -> None:
    """Position-wise loss: next-token NLL at each position averaged over documents, in position
    buckets; writes positionwise.csv, perplexity.png and run.json."""
    from statelens.analysis.positionwise import (TOLERANCE_NATS, bucket_losses, generalizes_to, in_context_loss,
                                                 position_losses)
    from statelens.analysis.buckets import bucket_edges
    from statelens.analysis.nonfinite import first_nonfinite_position
    from statelens.cli.common import report, start
    from statelens.resumable import sum_in_order
    from statelens.reports.figures import perplexity_figure

    run = start("perplexity", tokenizer=tokenizer, text_field=text_field, ckpt=ckpt, device=device, dtype=dtype,
                backend=backend, seed=seed, out=out, train_len=train_len, resume=resume, mitigation=mitigation,
                config={"data": str(data) if data else None, "train_len": train_len, "length": length,
                        "num_seqs": num_seqs, "buckets": buckets, "scale": scale.value, "chunk": chunk,
                        "group": group})
    length = length or 4 * run.train_len
    run.config["length"] = length
    sequences = run.sequences(data, num_seqs, length)
    run.lap("data")
    parts = run.sequence_groups(num_seqs, group, lambda rows, advance: {"nll": position_losses(
        run.model, sequences[rows], chunk=chunk, progress=advance)}, tokens_per_seq=length,
        description=f"loss over {length} tokens")
    summed = sum_in_order([part["nll"] for part in parts])
    df = bucket_losses(summed, num_seqs, bucket_edges(1, length, buckets, scale.value))
    run.lap("compute")
    in_context = in_context_loss(df, run.train_len)
    generalizes = generalizes_to(df, run.train_len)
    bad_at = first_nonfinite_position(summed)  # exact; positionwise.csv only knows the bucket
    found = {"in_context_loss": in_context, "generalizes_to": generalizes, "tolerance_nats": TOLERANCE_NATS}
    written = run.finish({"positionwise": df}, perplexity_figure(df, train_len=run.train_len),
                         results=found | ({"first_nonfinite_loss_position": bad_at} if bad_at else {}))
    last = df.iloc[-1]
    report(run, written, [
        f"loss within the training length: {in_context:.4f} (ppl {2.718281828 ** in_context:.2f})",
        f"loss at positions [{int(last.pos_start)}, {int(last.pos_end)}): {last.loss:.4f} (ppl {last.ppl:.2f})",
        f"length-generalizes to position {generalizes} of {length} (from the training length on, the loss pooled "
        f"over neighbouring buckets stays within {TOLERANCE_NATS} nats of the in-context loss)"]
        + ([f"the loss is first non-finite at position {bad_at}"] if bad_at else []))

