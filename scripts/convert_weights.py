"""Convert ESM-2 weights between fair-esm's format and a Hugging Face folder; export a fine-tuned backbone.

python scripts/convert_weights.py SOURCE DEST --to hf|fair-esm

SOURCE: a fair-esm file (esm2_t33_650M_UR50D.pt), a Hugging Face folder (config.json + weights), or a
train.py checkpoint (runs/x/checkpoints/best.pt): its backbone is exported, with LoRA adapters merged into
the weights (W + alpha / r * B A); bottleneck adapters cannot be merged and are refused.
DEST: `--to hf` writes a folder (config.json, model.safetensors, vocab.txt) that transformers'
EsmForMaskedLM.from_pretrained reads; `--to fair-esm` writes a .pt file that this project reads, and
fair-esm's own loader too when the source has the language-model head. Tensors are copied unchanged (a
fair-esm -> hf -> fair-esm round trip is exact). A train.py checkpoint has no language-model head: the
exported model has none either (fair-esm's loader refuses such a file; this project and transformers read it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import weights  # noqa: E402
from adapters import merge_lora  # noqa: E402
from config import ConfigError, resolve_config  # noqa: E402


def read_source(path: Path) -> tuple[dict, dict]:
    """(arch, fair-esm state dict) of a fair-esm file, a Hugging Face folder or a train.py checkpoint."""
    if path.is_file():
        try:  # weights_only (no code in the file can run), memory-mapped: a look at the keys is cheap
            ckpt = weights.torch_load(path, weights.FAIR_ESM_CLASSES, what="file")
        except weights.WeightsError:
            raise
        except Exception as err:
            raise weights.WeightsError(f"{path}: not a readable file ({err})") from None
        if isinstance(ckpt, dict) and {"model", "config", "arch"} <= set(ckpt):  # a train.py checkpoint
            from model import Encoder, load_model_state
            config = resolve_config(ckpt["config"], where=f"{path} (stored config)")
            model = Encoder(config, arch=ckpt["arch"])
            load_model_state(model, ckpt["model"], path)
            merge_lora(model.backbone)
            return ckpt["arch"], model.backbone.state_dict()
        del ckpt  # a fair-esm file: read_any maps it again
    if not path.exists():
        raise weights.WeightsError(f"{path}: no such file or folder")
    return weights.read_any(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--to", choices=["hf", "fair-esm"], required=True)
    args = p.parse_args(argv)
    try:
        if args.dest.exists() and (args.to == "fair-esm" or any(args.dest.iterdir())):  # before any loading
            raise weights.WeightsError(f"{args.dest}: already exists; choose a new destination")
        arch, state = read_source(args.source)
        if args.to == "hf":
            weights.write_hf_folder(arch, state, args.dest)
        else:
            weights.write_fair_esm(arch, state, args.dest)
    except (ConfigError, ValueError, OSError) as err:  # OSError: WeightsError, CheckpointError, WriteError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.dest} ({args.to}): ESM-2 {arch}, {len(state)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
