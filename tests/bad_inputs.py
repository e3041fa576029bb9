"""Bad inputs a user may try, and the error each gets: one list, checked by tests/test_bad_inputs.py and
printed as the README's table by ``python -m tests.bad_inputs`` (so the table stays true)."""
import torch

V = 32


def _llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16))


def _ids(b=4, t=8):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(0))


def _model_call(policy=None, **call):
    import cggr

    m = cggr.CGGRModel(_llama(), policy=policy or cggr.RandomRows(), min_tokens_ratio=0.5, warmup_steps=0)
    ids = _ids()
    return m(ids, labels=call.pop("labels", ids), **call)


def _cases():
    import cggr
    from cggr.experimental import ImportanceRows  # noqa: F401  (the error names it)

    return [
        ("`CGGRModel` of a plain `nn.Module`", lambda: cggr.CGGRModel(torch.nn.Linear(2, 2)), TypeError,
         "must be a Hugging Face causal LM"),
        ("`CGGRModel` of a masked LM (`BertForMaskedLM`)", lambda: cggr.CGGRModel(_bert()), TypeError,
         "got BertForMaskedLM"),
        ("`HardestRows()` (4-block router) on a 2-layer model", lambda: cggr.CGGRModel(_llama(), policy=cggr.HardestRows()),
         ValueError, "RouterSettings(layers=1)"),
        ("`router=` with `RandomRows()`", lambda: cggr.CGGRModel(
            _llama(3), policy=cggr.RandomRows(), router=cggr.create_truncated_router(_llama(3), num_layers=1)),
         ValueError, "Pass policy=cggr.HardestRows()"),
        ("`ExcessLossRows()` called without `reference_nll`", lambda: _model_call(cggr.ExcessLossRows()), ValueError,
         "pass reference_nll=[B, T-1]"),
        ("`reference_nll` given to `RandomRows()`", lambda: _model_call(reference_nll=torch.zeros(4, 7)), ValueError,
         "pass policy=cggr.ExcessLossRows()"),
        ("`reference_nll` of the wrong shape", lambda: _model_call(cggr.ExcessLossRows(), reference_nll=torch.zeros(4, 8)),
         ValueError, "expected a tensor of shape (4, 7)"),
        ("`labels` of another shape than `input_ids`", lambda: _model_call(labels=_ids(4, 6)), ValueError,
         "labels: expected shape (4, 8)"),
        ("`min_tokens_ratio=1.5`", lambda: cggr.CGGRModel(_llama(), min_tokens_ratio=1.5), ValueError,
         "min_tokens_ratio must be a number in (0, 1]"),
        ("`ReferenceFilter(threshold=float('nan'))`", lambda: cggr.ReferenceFilter(float("nan")), ValueError,
         "threshold must be a finite number"),
        ("`policy='hardest'` (a name instead of an object)", lambda: cggr.CGGRModel(_llama(), policy="hardest"),
         ValueError, "policy must be 'auto' or a cggr.RowPolicy"),
        ("0.5 keyword `selection='importance'`", lambda: cggr.CGGRModel(_llama(), selection="importance"), ValueError,
         "cggr.experimental.ImportanceRows"),
        ("`StepOptions(token_ratio=0.5)` without the fused loss", lambda: cggr.StepOptions(token_ratio=0.5), ValueError,
         "it needs loss_impl='fused'"),
        ("`RouterSettings(layers=0)`", lambda: cggr.RouterSettings(layers=0), ValueError,
         "RouterSettings.layers must be an int >= 1"),
        ("`CGGRLoss(min_tokens_ratio=0)`", lambda: cggr.CGGRLoss(min_tokens_ratio=0), ValueError,
         "min_tokens_ratio must be a number in (0, 1]"),
        ("`CGGRLoss` with a target outside the vocabulary", lambda: cggr.CGGRLoss()(torch.randn(4, V), torch.tensor([0, 1, 2, V])),
         ValueError, "target"),
        ("`CGGRLoss(scoring='hardness')`", lambda: cggr.CGGRLoss(scoring="hardness"), ValueError, "scoring"),
        ("`data_parallel=cggr.DataParallel()` without an initialised process group",
         lambda: cggr.CGGRModel(_llama(), data_parallel=cggr.DataParallel()), ValueError,
         "needs an initialised torch.distributed process group"),
        ("`cggr.DataParallel(selection='all')`", lambda: cggr.DataParallel(selection="all"), ValueError,
         "DataParallel.selection must be one of"),
        ("`CGGRLoss` with global selection", lambda: _loss_global(), ValueError, "selection='per_rank'"),
    ]


def _loss_global():
    """CGGRLoss(data_parallel=DataParallel(selection='global')) in a 1-process gloo group (a temporary one)."""
    import os
    import tempfile

    import torch.distributed as dist

    import cggr

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "rendezvous"), rank=0,
                                world_size=1)
        try:
            return cggr.CGGRLoss(data_parallel=cggr.DataParallel(selection="global"))
        finally:
            dist.destroy_process_group()


CASES = None


def cases():
    global CASES
    if CASES is None:
        CASES = _cases()
    return CASES


def error_of(case):
    _, fn, kind, _ = case
    try:
        fn()
    except kind as error:
        return error
    raise AssertionError(f"{case[0]}: no {kind.__name__} raised")


def table() -> str:
    """The README's markdown table: one row per case, the error as the code raises it now."""
    rows = ["| bad input | what you get |", "|---|---|"]
    for case in cases():
        error = error_of(case)
        text = str(error).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {case[0]} | `{type(error).__name__}`: {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
