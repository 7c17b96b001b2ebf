"""ESM-2 weights as users hold them, read offline into fair-esm's ESM2 module (one backbone).

Three sources, never a download:
  - a fair-esm file (`esm2_t33_650M_UR50D.pt`): encoder.checkpoint, or encoder.model_name found in the
    torch hub cache ($TORCH_HOME/hub/checkpoints);
  - a Hugging Face snapshot in the local Hugging Face cache: encoder.model_name as upstream writes it
    (`facebook/esm2_t33_650M_UR50D`; a bare fair-esm name is looked up there too), at refs/main or
    encoder.revision;
  - a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin, sharded with their
    index too): encoder.checkpoint: /path/to/folder.
Every tensor is mapped by name (Hugging Face -> fair-esm, see HF_TO_FAIR); a missing, unexpected or
wrongly shaped tensor is an error naming it and its file. The file's unused heads (lm_head,
contact_head, a pooler) are dropped on purpose and logged.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from argparse import Namespace
from pathlib import Path

import esm
import torch

from config import ConfigError
from utils import (UnsafeFileError, give_umask_mode, new_temp_dir, read_json, remove_stale_temps, save_checkpoint,
                   torch_load_safe)
from vocab import TOKENS

ESM_MODELS_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/"
HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")
LOG = logging.getLogger("mutarget")


class WeightsError(FileNotFoundError):
    """Pretrained weights are missing, unreadable or not ESM-2; the message names the file."""


# --------------------------------------------------------------------------- names
# Hugging Face tensor names (without the "esm." prefix of EsmForMaskedLM files) -> fair-esm ESM2 names.
HF_TO_FAIR = [
    (r"embeddings\.word_embeddings\.weight", "embed_tokens.weight"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"layers.\1.self_attn.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"layers.\1.self_attn.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"layers.\1.self_attn.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.rotary_embeddings\.inv_freq", r"layers.\1.self_attn.rot_emb.inv_freq"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.self_attn.out_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.LayerNorm\.(weight|bias)", r"layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.LayerNorm\.(weight|bias)", r"layers.\1.final_layer_norm.\2"),
    (r"encoder\.emb_layer_norm_after\.(weight|bias)", r"emb_layer_norm_after.\1"),
    (r"contact_head\.regression\.(weight|bias)", r"contact_head.regression.\1"),
    (r"lm_head\.(dense|layer_norm)\.(weight|bias)", r"lm_head.\1.\2"),
    (r"lm_head\.bias", "lm_head.bias"),
    (r"lm_head\.decoder\.weight", "lm_head.weight"),  # tied to the token embeddings
]
# One rotary inv_freq for every layer: transformers >= 5 writes it once (with a '*' or at model level).
HF_SHARED_INV_FREQ = (r"encoder\.layer\.\*\.attention\.self\.rotary_embeddings\.inv_freq", r"rotary_embeddings\.inv_freq")
HF_LEGACY = (r"embeddings\.position_embeddings\.weight", r"embeddings\.position_ids")  # listed by old 3B indexes
HF_POOLER = r"pooler\.dense\.(weight|bias)"  # EsmModel's randomly initialised pooler
HEADS = ("lm_head.", "contact_head.")  # fair-esm modules this project does not use
FAIR_ESM_CLASSES = (Namespace,)  # the one class a fair-esm file holds besides tensors (its settings)


def _hf_key(name: str) -> str:
    """A Hugging Face tensor name without the "esm." prefix, with the LayerNorm.gamma / .beta that
    transformers >= 5 writes read as .weight / .bias."""
    key = name[4:] if name.startswith("esm.") else name
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def hf_to_fair(state: dict, num_layers: int, source: dict) -> tuple[dict, list[str], dict]:
    """Hugging Face state dict -> (fair-esm state dict, names dropped on purpose, fair-esm name ->
    file). source: Hugging Face name -> file, for error messages. Unknown names are errors."""
    out, dropped, fair_source, shared_inv_freq = {}, [], {}, None
    for name, tensor in state.items():
        key = _hf_key(name)
        if any(re.fullmatch(p, key) for p in HF_SHARED_INV_FREQ):
            shared_inv_freq = tensor, source.get(name, "?")
            continue
        if re.fullmatch(HF_POOLER, key) or any(re.fullmatch(p, key) for p in HF_LEGACY):
            dropped.append(name)
            continue
        for pattern, target in HF_TO_FAIR:
            if re.fullmatch(pattern, key):
                fair_name = re.sub(pattern, target, key)
                out[fair_name], fair_source[fair_name] = tensor, source.get(name, "?")
                break
        else:
            raise WeightsError(f"{source.get(name, '?')}: unexpected tensor {name!r} (not a tensor of ESM-2)")
    if shared_inv_freq is not None:
        for i in range(num_layers):
            fair_name = f"layers.{i}.self_attn.rot_emb.inv_freq"
            if fair_name not in out:
                out[fair_name], fair_source[fair_name] = shared_inv_freq
    return out, dropped, fair_source


def fair_to_hf(state: dict) -> dict:
    """fair-esm ESM2 state dict -> Hugging Face EsmForMaskedLM names ("esm." prefix; the tied
    lm_head.weight is left out, as transformers writes it)."""
    out = {}
    for name, tensor in state.items():
        hf = _fair_name_to_hf(name)
        if hf is None:
            raise WeightsError(f"fair-esm tensor {name!r} has no Hugging Face name")
        if hf:
            out[hf] = tensor
    return out


def _fair_name_to_hf(name: str) -> str | None:
    """One fair-esm name -> its Hugging Face name ('' for the tied lm_head.weight; None if unknown)."""
    if name == "lm_head.weight":
        return ""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        layer, rest = m.groups()
        parts = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
                 "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
                 "self_attn_layer_norm": "attention.LayerNorm", "fc1": "intermediate.dense",
                 "fc2": "output.dense", "final_layer_norm": "LayerNorm"}
        if rest == "self_attn.rot_emb.inv_freq":
            return f"esm.encoder.layer.{layer}.attention.self.rotary_embeddings.inv_freq"
        module, _, leaf = rest.rpartition(".")
        return f"esm.encoder.layer.{layer}.{parts[module]}.{leaf}" if module in parts else None
    fixed = {"embed_tokens.weight": "esm.embeddings.word_embeddings.weight"}
    if name in fixed:
        return fixed[name]
    for prefix, hf in (("emb_layer_norm_after.", "esm.encoder.emb_layer_norm_after."),
                       ("contact_head.regression.", "esm.contact_head.regression."), ("lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return hf + name[len(prefix):]
    return None


# --------------------------------------------------------------------------- files
def torch_load(path, allowed=(), what: str = "weight file"):
    """utils.torch_load_safe onto the CPU (tensors, numbers, strings, lists, dicts and the `allowed`
    classes only: no code in the file can run), memory-mapped (no copy in memory) unless the file is a
    legacy (non-zip) torch file, which cannot be memory-mapped. A refused file: WeightsError."""
    try:
        try:
            return torch_load_safe(path, allowed, mmap=True, what=what)
        except RuntimeError:
            return torch_load_safe(path, allowed, what=what)
    except UnsafeFileError as err:
        raise WeightsError(str(err)) from None


def read_fair_esm(path) -> tuple[dict, dict]:
    """A fair-esm file ({'cfg': {'model': ...}, 'model': state}) -> (arch, fair-esm state dict). Read with
    weights_only: besides tensors, only the argparse.Namespace that fair-esm stores its settings in."""
    path = Path(path)
    try:
        data = torch_load(path, FAIR_ESM_CLASSES, what="fair-esm weight file")
    except WeightsError:
        raise
    except Exception as err:  # truncated file, not a torch file
        raise WeightsError(f"{path}: not a readable fair-esm weight file ({err})") from None
    if not isinstance(data, dict) or "model" not in data or "cfg" not in data:
        raise WeightsError(f"{path}: not an ESM-2 checkpoint in fair-esm's format (needs 'cfg' and 'model')")
    cfg = data["cfg"]["model"]
    cfg = vars(cfg) if isinstance(cfg, Namespace) else dict(cfg)
    state = {re.sub(r"^encoder\.(sentence_encoder\.)?", "", k): v for k, v in data["model"].items()}
    if "emb_layer_norm_before.weight" in state or "embed_positions.weight" in state or "encoder_layers" not in cfg:
        raise WeightsError(f"{path}: an ESM-1 / ESM-1b / ESM-1v file (learned positions, "
                           f"emb_layer_norm_before), not ESM-2")
    arch = {"num_layers": int(cfg["encoder_layers"]), "embed_dim": int(cfg["encoder_embed_dim"]),
            "attention_heads": int(cfg["encoder_attention_heads"]), "token_dropout": bool(cfg.get("token_dropout", True))}
    return arch, state


def hf_arch(config_path: Path) -> dict:
    """ESM2 architecture from a Hugging Face config.json; refuses what is not ESM-2."""
    cfg = read_json(config_path, "a readable config.json", WeightsError, max_bytes=1 << 20)
    if not isinstance(cfg, dict):
        raise WeightsError(f"{config_path}: not a readable config.json (a JSON object is expected)")
    problems = []
    if cfg.get("model_type") != "esm":
        problems.append(f"model_type is {cfg.get('model_type')!r}, not 'esm'")
    elif cfg.get("emb_layer_norm_before") or cfg.get("position_embedding_type", "absolute") != "rotary":
        problems.append("an ESM-1b / ESM-1v model (emb_layer_norm_before or learned positions), not ESM-2")
    elif cfg.get("is_folding_model"):
        problems.append("an ESMFold model, not an ESM-2 language model")
    else:
        d = cfg.get("hidden_size")
        expected = {"vocab_size": 33, "intermediate_size": 4 * d if d else None, "hidden_act": "gelu"}
        problems += [f"{k} is {cfg.get(k)!r}, ESM-2 has {v!r}" for k, v in expected.items() if cfg.get(k, v) != v]
        if abs(cfg.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-9:
            problems.append(f"layer_norm_eps is {cfg['layer_norm_eps']}, ESM-2 has 1e-05")
    if problems:
        raise WeightsError(f"{config_path}: {'; '.join(problems)}")
    return {"num_layers": int(cfg["num_hidden_layers"]), "embed_dim": int(cfg["hidden_size"]),
            "attention_heads": int(cfg["num_attention_heads"]),
            "token_dropout": bool(cfg.get("token_dropout", False))}  # transformers' EsmConfig default


def hf_weight_files(folder: Path) -> tuple[str, list[str]]:
    """(listing file, weight files) of the first format in HF_WEIGHT_FILES whose files are all there:
    a snapshot may hold an index whose shards were never fetched beside a complete other format."""
    first_problem = None
    for name in HF_WEIGHT_FILES:
        if not (folder / name).is_file():
            continue
        if name.endswith(".index.json"):
            try:
                index = read_json(folder / name, "a readable weight index", WeightsError)
                files = sorted(set(index["weight_map"].values()))
            except (KeyError, AttributeError, TypeError) as err:
                raise WeightsError(f"{folder / name}: not a readable weight index ({err})") from None
            outside = [f for f in files if not isinstance(f, str) or Path(f).is_absolute() or ".." in Path(f).parts]
            if outside:
                raise WeightsError(f"{folder / name}: weight_map names {repr(outside[0])[:80]}, not a file of this "
                                   f"folder; only files inside it are read")
        else:
            files = [name]
        missing = [f for f in files if not (folder / f).is_file()]
        if not missing:
            return name, files
        first_problem = first_problem or f"{folder / missing[0]}: weight shard listed in {folder / name} is missing"
    raise WeightsError(first_problem or f"{folder}: no weights (expected one of {', '.join(HF_WEIGHT_FILES)})")


def read_hf_tensors(folder: Path) -> tuple[dict, dict]:
    """Every tensor of a Hugging Face folder -> (state, name -> file). Prefers safetensors; sharded
    files are read through their index."""
    _, files = hf_weight_files(folder)
    state, source = {}, {}
    for file in files:
        path = folder / file
        try:
            if file.endswith(".safetensors"):
                from safetensors.torch import load_file
                tensors = load_file(path)
            else:
                tensors = torch_load(path)
        except WeightsError:
            raise
        except Exception as err:
            raise WeightsError(f"{path}: not a readable weight file ({err})") from None
        state.update(tensors)
        source.update(dict.fromkeys(tensors, str(path)))
    return state, source


def read_hf_folder(folder, keep_heads: bool = False) -> tuple[dict, dict, dict]:
    """A Hugging Face ESM-2 folder -> (arch, fair-esm state dict, name -> file). The unused heads
    (lm_head, contact_head) are dropped unless keep_heads; pooler and legacy names always."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder}: no config.json (a Hugging Face model folder holds config.json and "
                           f"model.safetensors or pytorch_model.bin)")
    arch = hf_arch(config_path)
    hf_state, source = read_hf_tensors(folder)
    state, dropped, fair_source = hf_to_fair(hf_state, arch["num_layers"], source)
    fair_source[""] = ", ".join(sorted(set(source.values())))  # the files read, for missing tensors
    if not keep_heads:
        dropped += [k for k in state if k.startswith(HEADS)]
        state = {k: v for k, v in state.items() if not k.startswith(HEADS)}
    if dropped:
        LOG.info("%s: %d tensor(s) of unused heads dropped (%s)", folder, len(dropped),
                 ", ".join(sorted({d.split(".")[0] if not d.startswith("esm.") else ".".join(d.split(".")[:2])
                                   for d in dropped})))
    return arch, state, fair_source


def build_esm2(arch: dict, state: dict, source: str | dict) -> esm.model.esm2.ESM2:
    """fair-esm's ESM2 (without lm_head and contact_head) holding exactly `state` (fair-esm names).
    Missing, unexpected or wrongly shaped tensors are errors naming the tensor and its file; the
    model is built on the meta device, so no memory is spent on a random initialisation."""
    def where(name):
        return source.get(name, source.get("", "?")) if isinstance(source, dict) else source

    with torch.device("meta"):
        model = esm.model.esm2.ESM2(alphabet="ESM-1b", **arch)
    model.lm_head = model.contact_head = None
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(HEADS)}
    for name in state:
        if name not in expected:
            raise WeightsError(f"{where(name)}: unexpected tensor {name!r} for an ESM-2 of {arch}")
    for name, ref in expected.items():
        if name not in state:
            raise WeightsError(f"{where(name)}: tensor {name!r} is missing (ESM-2 of {arch})")
        if tuple(state[name].shape) != tuple(ref.shape):
            raise WeightsError(f"{where(name)}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                               f"expected {tuple(ref.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model


# --------------------------------------------------------------------------- where weights are
def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a hub model (refs/main, or `revision`: a branch, tag or
    commit), or None when the cache does not hold it. Never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        return None


def torch_hub_file(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def not_found(what: str, name: str, searched: list[str]) -> WeightsError:
    """One error: the places searched and the three ways to provide ESM-2 weights (`name`, the
    model asked for, fills the examples)."""
    short = name.split("/")[-1]
    short = short if short.startswith("esm2_") else "esm2_t33_650M_UR50D"
    return WeightsError(
        f"ESM-2 weights not found: {what}. Searched:\n" + "".join(f"  - {s}\n" for s in searched) +
        f"Provide them in one of three ways (nothing is ever downloaded):\n"
        f"  1. fair-esm file: copy {short}.pt (from {ESM_MODELS_URL}{short}.pt) to {torch_hub_file(short)} "
        f"(the torch hub cache; set TORCH_HOME to move it) and keep encoder.model_name: {short}, or set "
        f"encoder.checkpoint: /path/to/{short}.pt;\n"
        f"  2. Hugging Face cache: `hf download facebook/{short}` on a machine with internet, copy the cache "
        f"folder here and point HF_HUB_CACHE (or HF_HOME) at it; keep encoder.model_name: facebook/{short};\n"
        f"  3. Hugging Face folder: encoder.checkpoint: /path/to/folder holding config.json and "
        f"model.safetensors (or pytorch_model.bin).")


def locate(encoder_cfg) -> tuple[str, Path]:
    """('fair-esm', file) or ('hf', folder) of the configured pretrained weights."""
    if encoder_cfg["checkpoint"] is not None:
        path = Path(encoder_cfg["checkpoint"]).expanduser()
        if path.is_dir():
            return "hf", path
        if path.is_file():
            return "fair-esm", path
        raise not_found(f"{path} (encoder.checkpoint)", path.stem, [f"{path}: no such file or folder"])
    name, revision = encoder_cfg["model_name"], encoder_cfg["revision"]
    short = name.split("/")[-1]
    if "/" not in name and not name.startswith("esm2_"):
        raise ConfigError(f"encoder.model_name must be an ESM-2 model such as esm2_t33_650M_UR50D or "
                          f"facebook/esm2_t33_650M_UR50D, got {name!r}")
    repo = name if "/" in name else f"facebook/{name}"
    searched = []
    if revision is None and repo.startswith("facebook/"):  # fair-esm files: Meta's models, no revisions
        pt = torch_hub_file(short)
        if pt.is_file():
            return "fair-esm", pt
        searched.append(f"torch hub cache: {pt}")
    snapshot = hub_snapshot(repo, revision)
    if snapshot is not None:
        return "hf", snapshot
    searched.append(f"Hugging Face cache: {hub_cache_dir() / ('models--' + repo.replace('/', '--'))} "
                    f"(revision {revision or 'main'}; from HF_HUB_CACHE / HF_HOME / XDG_CACHE_HOME)")
    raise not_found(f"{name} (encoder.model_name)", repo, searched)


def load_pretrained(encoder_cfg) -> esm.model.esm2.ESM2:
    """The configured pretrained ESM-2 (fair-esm file, Hugging Face cache or folder), offline."""
    kind, path = locate(encoder_cfg)
    if kind == "hf":
        arch, state, source = read_hf_folder(path)
    else:
        arch, state = read_fair_esm(path)
        source = str(path)
    LOG.info("ESM-2 weights: %s (%s format)", path, "Hugging Face" if kind == "hf" else "fair-esm")
    return build_esm2(arch, state, source)


# --------------------------------------------------------------------------- writing (scripts/convert_weights.py)
def hf_config(arch: dict) -> dict:
    """config.json of a Hugging Face EsmForMaskedLM with this ESM-2 architecture."""
    return {"architectures": ["EsmForMaskedLM"], "model_type": "esm", "vocab_size": 33,
            "hidden_size": arch["embed_dim"], "num_hidden_layers": arch["num_layers"],
            "num_attention_heads": arch["attention_heads"], "intermediate_size": 4 * arch["embed_dim"],
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 1026, "position_embedding_type": "rotary", "layer_norm_eps": 1e-05,
            "initializer_range": 0.02, "pad_token_id": 1, "mask_token_id": 32, "token_dropout": arch["token_dropout"],
            "emb_layer_norm_before": False, "is_folding_model": False, "use_cache": True, "torch_dtype": "float32"}


def safetensors_ready(state: dict) -> dict:
    """Tensors safetensors can write: detached, contiguous, none sharing memory with another (safetensors
    refuses shared memory; those are copied)."""
    tensors, storages = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


def write_hf_folder(arch: dict, state: dict, folder) -> None:
    """A Hugging Face folder (config.json, model.safetensors, vocab.txt) from a fair-esm state dict;
    written into a temporary folder beside it, then renamed (never half-written)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder.parent)
    tmp = Path(new_temp_dir(folder.parent, folder.name))
    try:
        save_file(safetensors_ready(fair_to_hf(state)), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        give_umask_mode(tmp / "model.safetensors")  # safetensors writes 0600
        (tmp / "config.json").write_text(json.dumps(hf_config(arch), indent=2) + "\n")
        (tmp / "vocab.txt").write_text("\n".join(TOKENS) + "\n")  # the same alphabet, in id order
        if folder.exists():
            folder.rmdir()  # only an empty folder is replaced
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_fair_esm(arch: dict, state: dict, path) -> None:
    """A fair-esm file ({'cfg': {'model': Namespace}, 'model': {'encoder.' + name: tensor}}), atomically."""
    cfg = Namespace(arch="ESM2", encoder_layers=arch["num_layers"], encoder_embed_dim=arch["embed_dim"],
                    encoder_ffn_embed_dim=4 * arch["embed_dim"], encoder_attention_heads=arch["attention_heads"],
                    token_dropout=arch["token_dropout"])
    save_checkpoint({"cfg": {"model": cfg}, "model": {"encoder." + k: v for k, v in state.items()}}, path)


def read_any(path) -> tuple[dict, dict]:
    """(arch, fair-esm state dict with the LM head when the source has one) of a fair-esm file or a
    Hugging Face folder; the tied lm_head.weight is restored for Hugging Face sources."""
    path = Path(path)
    if path.is_dir():
        arch, state, _ = read_hf_folder(path, keep_heads=True)
        if "lm_head.dense.weight" in state and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        return arch, state
    return read_fair_esm(path)
