"""Translate an upstream MUTarget config (github.com/yuexujiang/MUTarget, or its SupCon branch)
into this project's config.

python scripts/convert_upstream_config.py UPSTREAM.yaml OUT.yaml

Every upstream key is accounted for: the report printed on stdout lists what each translated key
became and, for every key that could not be translated, the reason. OUT.yaml holds only the keys
that came from upstream (everything else takes config.DEFAULTS), each commented with its source,
and is checked with config.resolve_config before it is written. Bad input (missing file, invalid
YAML, a value of the wrong type, a backbone other than ESM-2): a message naming the file and the
key, exit code 2, nothing written. docs/upstream.md maps the two codebases side by side.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import DEFAULTS, ConfigError, resolve_config  # noqa: E402
from utils import write_text_atomic  # noqa: E402

ESM2_NAME = re.compile(r"^(facebook/)?esm2_t(\d+)_(\d+[MB])_UR50D$")
ESM2_WIDTH = {6: 320, 12: 480, 30: 640, 33: 1280, 36: 2560, 48: 5120}  # embed_dim by layer count
TRAIN_PROTEINS = 3174  # training proteins of fold 0 of MUTarget's data: converts upstream's warm-up steps to epochs
UPSTREAM_PROJECTION = {"hidden_dim": 512, "out_dim": 256}  # the SupCon branch's LayerNormNet(configs) defaults
MISSING = object()


class ConversionError(ValueError):
    """Upstream config that cannot be converted; the message names the file and the key."""


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (leaves only; an empty block is a leaf)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Conversion:
    """One upstream config (flattened) being translated: set() records a translated value with
    its source, drop() an upstream key that is not translated with the reason."""

    def __init__(self, upstream: dict, where: str):
        self.up, self.where = flatten(upstream), where
        self.tree: dict = {}  # our config, nested
        self.sources: dict = {}  # our dotted key -> where the value came from
        self.translated: list = []  # (upstream key or '(implied)', our key, value, note)
        self.dropped: dict = {}  # upstream key -> reason

    def has(self, key: str) -> bool:
        return key in self.up

    def raw(self, key: str, default=MISSING):
        return self.up.get(key, default)

    def number(self, key: str, kind=float, default=MISSING):
        """The upstream value as int / float (upstream YAML often holds '1e-5' as a string)."""
        value = self.up.get(key, default)
        if value is MISSING:
            raise ConversionError(f"{self.where}: key '{key}' is missing")
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise ConversionError(f"{self.where}: '{key}' must be {'an integer' if kind is int else 'a number'}, "
                                  f"got {value!r}")
        return kind(number)

    def flag(self, key: str, default=MISSING) -> bool:
        value = self.up.get(key, default)
        if not isinstance(value, bool):
            raise ConversionError(f"{self.where}: '{key}' must be true or false, got {value!r}")
        return value

    def set(self, ours: str, value, source: str, note: str = "") -> None:
        node = self.tree
        *parents, leaf = ours.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        self.sources[ours] = source
        self.translated.append((source, ours, value, note))

    def drop(self, key: str, reason: str, partly: bool = False) -> None:
        """Report `key` as not translated (partly: translated to the nearest, the rest lost); a key
        already translated is skipped unless partly."""
        if key in self.up and (partly or key not in {source for source, *_ in self.translated}):
            self.dropped.setdefault(key, reason)

    def drop_all(self, prefix: str, reason: str) -> None:
        for key in self.up:
            if key == prefix or key.startswith(prefix + "."):
                self.drop(key, reason)

    def handled(self) -> set:
        return {source for source, *_ in self.translated} | set(self.dropped)


# --------------------------------------------------------------------------- translation by block
def convert_top(c: Conversion) -> None:
    if c.has("fix_seed"):
        c.set("seed", c.number("fix_seed", int), "fix_seed")
    if c.has("result_path"):
        c.set("run_dir", str(c.raw("result_path")), "result_path",
              "upstream wrote into a time-stamped subfolder of result_path; run_dir itself holds the run here")
    c.drop("config_path", "train.py writes the resolved config to run_dir/config.yaml")
    c.drop("checkpoints_every", "checkpoints here: last.pt after every epoch and best.pt at each improvement")
    resuming = c.raw("resume.resume", False) is True
    c.drop_all("resume", "resuming is the command-line flag `train.py --resume CHECKPOINT`, and only from this "
                         "project's own checkpoints (upstream's .pth files hold a different model)"
               + (": this config asked to resume from " + repr(c.raw("resume.resume_path", "?")) if resuming else ""))


def esm2_layers(c: Conversion) -> tuple[str, int]:
    """(model name, number of layers) of the upstream ESM-2; anything else is an error."""
    name = c.raw("encoder.model_name")
    if name is MISSING:
        raise ConversionError(f"{c.where}: key 'encoder.model_name' is missing")
    match = ESM2_NAME.match(str(name))
    if not match:
        raise ConversionError(f"{c.where}: encoder.model_name {name!r} is not an ESM-2 model; this project runs "
                              "ESM-2 backbones only (esm2_t6_8M_UR50D ... esm2_t48_15B_UR50D, with or without "
                              "the 'facebook/' prefix)")
    return str(name), int(match.group(2))


def trainable_from_slice(c: Conversion, n_layers: int) -> tuple[int, str, str]:
    """Upstream trains `layers[fine_tune_lr:]` (a Python slice): (number of those layers, source, note)."""
    if not c.has("train_settings.fine_tune_lr"):
        return 2, "(implied)", "train_settings.fine_tune_lr is missing (upstream's code needs it): its usual -2"
    start = c.number("train_settings.fine_tune_lr", int)
    k = min(-start, n_layers) if start < 0 else max(n_layers - start, 0)
    return k, "train_settings.fine_tune_lr", f"upstream trains layers[{start}:] of {n_layers}"


def convert_encoder(c: Conversion) -> None:
    name, n_layers = esm2_layers(c)
    c.set("encoder.model_name", name, "encoder.model_name",
          "read as a Hugging Face hub name" if "/" in name else "fair-esm name (torch hub cache)")
    if c.has("encoder.max_len"):
        max_len = c.number("encoder.max_len", int)
        if max_len < 3:
            raise ConversionError(f"{c.where}: encoder.max_len must be at least 3 (2 special tokens + 1 residue), "
                                  f"got {max_len}")
        c.set("data.max_len", max_len - 2, "encoder.max_len",
              f"upstream's {max_len} counts BOS and EOS; data.max_len counts residues")
    if c.has("encoder.frag_overlap"):
        c.set("data.overlap", c.number("encoder.frag_overlap", int), "encoder.frag_overlap")
    for key in ("encoder.composition", "encoder.model_type"):
        value = c.raw(key)
        if value in ("esm_v2", "official_esm_v2"):
            c.drop(key, f"{value!r} (Hugging Face or fair-esm ESM-2): no setting needed, encoder.model_name decides")
        else:
            c.drop(key, f"{value!r}: only ESM-2 backbones exist here; the ESM-2 named in encoder.model_name is used")
    c.drop("encoder.num_classes", "fixed here: 8 classes, and 'Other' is a protein without any (upstream's 9 "
                                  "counted Other as a class)")
    c.drop("encoder.prm4prmpro", "PromptProtein's task prompt: PromptProtein is not supported")
    c.drop_all("encoder.cnn_filter_num", "the optional CNN of upstream's fair-esm path has no equivalent")
    c.drop_all("encoder.cnn_filter_size", "the optional CNN of upstream's fair-esm path has no equivalent")
    convert_peft(c, n_layers)


def convert_peft(c: Conversion, n_layers: int) -> None:
    """PEFT (+ fine_tune_lr, lora_lr_num, adapter_lr_num, prompt_*) -> encoder.tune and friends."""
    mode = c.raw("PEFT", "PFT")
    source = "PEFT" if c.has("PEFT") else "(implied)"
    used = set()
    if mode == "FT":
        c.set("encoder.tune", "full", source)
    elif mode == "frozen":
        c.set("encoder.tune", "frozen", source)
    elif mode in ("PFT", "lora_PFT", "Adapter_PFT"):
        k, k_source, note = trainable_from_slice(c, n_layers)
        c.set("encoder.tune", "last_k" if k else "frozen", source)
        if k:
            c.set("encoder.trainable_layers", k, k_source, note)
        used.add("train_settings.fine_tune_lr")
        if mode == "lora_PFT":
            c.drop("PEFT", "lora_PFT: the fully tuned last layers are kept (encoder.tune: last_k); upstream's LoRA "
                           "on the query and key projections of every layer is lost (one tuning mode at a time here; "
                           "the full layers hold most of the trainable parameters)", partly=True)
        elif mode == "Adapter_PFT":
            c.drop("PEFT", "Adapter_PFT: the fully tuned last layers are kept (encoder.tune: last_k); upstream's "
                           "adapters in the last encoder.adapter_lr_num layers are lost (one tuning mode at a time)",
                   partly=True)
            c.drop("encoder.adapter_lr_num", "adapters are not kept with Adapter_PFT (see PEFT)")
    elif mode == "lora":
        c.set("encoder.tune", "lora", source)
        if c.has("encoder.lora_lr_num") and c.number("encoder.lora_lr_num", int) > 0:
            c.set("encoder.trainable_layers", min(c.number("encoder.lora_lr_num", int), n_layers),
                  "encoder.lora_lr_num", "LoRA in the last lora_lr_num layers")
        else:
            c.set("encoder.trainable_layers", n_layers, "(implied)",
                  "encoder.lora_lr_num missing or <= 0 (upstream's code then fails): LoRA in every layer")
        used.add("encoder.lora_lr_num")
        note = "peft's LoraConfig defaults, which upstream kept"
        c.set("encoder.lora.rank", 8, "(implied)", note)
        c.set("encoder.lora.alpha", 8.0, "(implied)", note)
        c.set("encoder.lora.dropout", 0.0, "(implied)", note)
        c.set("encoder.lora.targets", ["q", "k", "v"], "(implied)", "upstream's targets: query, key, value")
    elif mode in ("Adapter", "adapter"):
        fair_esm = c.raw("encoder.composition") == "official_esm_v2" and mode == "Adapter"
        c.set("encoder.tune", "adapter", source, "" if fair_esm else
              "upstream built adapters only for PEFT 'Adapter' with composition official_esm_v2; otherwise its "
              "backbone stayed frozen: translated as the evident intent")
        if c.has("encoder.adapter_lr_num"):
            c.set("encoder.trainable_layers", min(c.number("encoder.adapter_lr_num", int), n_layers),
                  "encoder.adapter_lr_num", "adapters in the last adapter_lr_num layers")
        else:
            c.set("encoder.trainable_layers", 2, "(implied)",
                  "encoder.adapter_lr_num missing: the 2 layers upstream's older code hard-coded")
        used.add("encoder.adapter_lr_num")
        c.set("encoder.adapter.dim", ESM2_WIDTH.get(n_layers, 0) // 2 or DEFAULTS["encoder"]["adapter"]["dim"],
              "(implied)", "upstream's bottleneck: half the embedding width (no upstream key)")
    elif mode == "PrefixPrompt":
        c.set("encoder.tune", "frozen", source)
        c.drop("PEFT", "PrefixPrompt: learned prefix prompts are not supported; the nearest is a frozen backbone "
                       "(set encoder.tune: lora or adapter for a small trainable part)", partly=True)
    elif mode == "projector":
        c.set("encoder.tune", "frozen", source)
        c.drop("PEFT", "projector: upstream's CNN + transformer layer over the frozen ESM-2 is not supported; "
                       "the backbone stays frozen and the heads read its output directly", partly=True)
    else:
        c.set("encoder.tune", "frozen", source)
        c.drop("PEFT", f"{mode!r} is no mode upstream's code handles: it then froze the whole backbone, as here",
               partly=True)
    if mode not in ("Adapter", "adapter") and "encoder.adapter_lr_num" not in used:
        c.drop("encoder.adapter_lr_num", f"used by upstream only with PEFT Adapter (this config: {mode})")
    if mode != "lora" and "encoder.lora_lr_num" not in used:
        c.drop("encoder.lora_lr_num", f"used by upstream only with PEFT lora (this config: {mode})")
    if "train_settings.fine_tune_lr" not in used:
        c.drop("train_settings.fine_tune_lr", f"used by upstream only with the *PFT modes (this config: {mode})")
    c.drop("encoder.prompt_len", "prefix prompts (PEFT PrefixPrompt) are not supported")
    c.drop("encoder.prompt_layer_indices", "prefix prompts (PEFT PrefixPrompt) are not supported")


def convert_train(c: Conversion) -> None:
    ts = "train_settings."
    for up, ours, kind in (("num_epochs", "train.epochs", int), ("batch_size", "train.batch_size", int)):
        if c.has(ts + up):
            c.set(ours, c.number(ts + up, kind), ts + up)
    if c.has(ts + "grad_accumulation"):  # upstream steps every batch; this number only shortened its cosine cycle
        c.drop(ts + "grad_accumulation", "upstream never accumulated gradients (the optimiser stepped every batch); "
               "it only divided the cosine cycle length in utils.prepare_optimizer: train.accumulate stays 1")
    if c.has(ts + "patience"):
        c.set("train.patience", c.number(ts + "patience", int), ts + "patience",
              "counted here in epochs without a validation macro-MCC gain (upstream: validation loss, per class task)")
    if c.has(ts + "clip_grad_norm"):
        c.set("train.grad_clip", c.number(ts + "clip_grad_norm"), ts + "clip_grad_norm", "applied after AMP unscaling")
        c.drop("optimizer.grad_clip_norm", "upstream's code never read it; train_settings.clip_grad_norm is used")
    elif c.has("optimizer.grad_clip_norm"):
        c.set("train.grad_clip", c.number("optimizer.grad_clip_norm"), "optimizer.grad_clip_norm",
              "upstream's code never read this key (main clips with train_settings.clip_grad_norm, the SupCon "
              "branch did not clip); taken as the intent")
    c.drop(ts + "device", "device: auto (CUDA when present); pin one with --set device=cuda:N")
    c.drop(ts + "shuffle", "training is always shuffled here, by (seed, epoch)")
    c.drop(ts + "log_every", "progress: a tqdm bar or a log line at most every 30 s; per-step values: log.tensorboard")
    c.drop(ts + "dataset", "set data.root to the data folder; 'v2' is parsed_EC7_v2, which this project reads, "
                           "other versions (cd-hit subsets, v3, v4) have no equivalent here")
    c.drop(ts + "dataloader", "one loader here; SupCon sampling is switched by supcon.apply")
    for key in ("loss_pos_weight", "loss_pos_weight_nucleus", "loss_pos_weight_nucleus_export", "additional_pos_weights"):
        c.drop(ts + key, "the motif loss's positive weights are counted from the training split here "
                         "(negative / positive residues per class, capped by train.max_pos_weight)")
    c.drop(ts + "other_weight", "there is no 'Other' residue track here")
    c.drop_all(ts + "train_9_classes", "8 classes here; 'Other' is a protein without any")
    for key in ("weighted_loss_sum_start_epoch", "loss_sum_weights"):
        c.drop(ts + key, "upstream's code that read it is commented out; train.motif_weight weights the motif loss here")
    c.drop(ts + "predict_max", "class scores come from a classifier over the pooled embedding here, not from the "
                               "max / mean of the motif tracks")
    for key in ("add_sample_weight_to_position_loss", "add_sample_weight_to_class_loss_when_data_aug"):
        c.drop(ts + key, "class weighting here: train.class_weighting (inverse_count, upstream's min/count rescaled)")
    c.drop(ts + "only_use_position_loss", "the class and motif losses are always both used (train.motif_weight)")
    ratio = ""
    if c.has(ts + "position_loss_T") and c.has(ts + "class_loss_T"):
        ratio = f" (here {c.number(ts + 'class_loss_T'):g} / {c.number(ts + 'position_loss_T'):g})"
    for key in ("position_loss_T", "class_loss_T"):
        c.drop(ts + key, "upstream main divided the motif loss by position_loss_T and the class loss by class_loss_T, a "
                         f"motif / class weight ratio of class_loss_T / position_loss_T{ratio}; its motif loss was a "
                         "9-way cross-entropy per residue (Other included), not this project's per-class BCE, so the "
                         "ratio does not carry over: set train.motif_weight yourself")
    c.drop(ts + "ignore_ori", "no equivalent (an option of upstream's augmentation)")
    c.drop_all(ts + "MLM", "masked-token training is not supported")
    convert_augment(c)
    if c.has("valid_settings.batch_size"):
        c.set("train.eval_batch_size", c.number("valid_settings.batch_size", int), "valid_settings.batch_size")
    c.drop("valid_settings.do_every", "validation runs after every epoch here")
    c.drop("valid_settings.device", "device: auto")
    c.drop("valid_settings.cutoff", "thresholds: 0.5, and per-class MCC-optimal ones tuned on validation")
    c.drop_all("predict_settings", "predict.py options here: --batch-size, --device, --tuned-thresholds "
                                   "(0.5 or validation-tuned thresholds; no per-class cutoffs)")


def convert_augment(c: Conversion) -> None:
    aug = "train_settings.data_aug."
    if c.has(aug + "enable"):
        c.set("train.augment.apply", c.flag(aug + "enable"), aug + "enable",
              "mutated copies are drawn afresh every epoch, as upstream regenerated them")
    for up, ours in (("pos_mutation_rate", "pos_rate"), ("neg_mutation_rate", "neg_rate")):
        if c.has(aug + up):
            c.set(f"train.augment.{ours}", c.number(aug + up), aug + up)
    if c.has(aug + "mutation_rate"):
        if c.has(aug + "neg_mutation_rate"):
            c.drop(aug + "mutation_rate", "superseded by neg_mutation_rate in this config")
        else:  # the SupCon branch's older augmentation mutated residues outside the signals only
            c.set("train.augment.neg_rate", c.number(aug + "mutation_rate"), aug + "mutation_rate",
                  "the older single rate applied outside the signal regions only")
            if not c.has(aug + "pos_mutation_rate"):
                c.set("train.augment.pos_rate", 0.0, "(implied)", "the older augmentation left signal regions unmutated")
    if c.has(aug + "per_times"):
        c.set("train.augment.max_copies", max(c.number(aug + "per_times", int), 1), aug + "per_times",
              "upstream: ceil(per_times * min_count / count of the protein's rarest class) copies (every protein "
              "per_times copies in the SupCon branch's older code); here ceil(largest / rarest class count), at most "
              "max_copies: the same maximum, other counts for the common classes")
    binomial = c.raw(aug + "binomial", True)
    c.drop(aug + "binomial", "same: each residue is mutated with its own probability here" if binomial is True else
           "upstream mutated a fixed number of residues per window; here each residue with its own probability "
           "(the same expected rate)")
    original = c.raw(aug + "add_original", False)
    c.drop(aug + "add_original", "same: no unmutated original is added" if original is False else
           "the unmutated original is not added here: every copy is mutated")
    c.drop(aug + "add_original_but_not_export", "no equivalent (every copy is mutated)")
    for key in ("warmup", "cooldown"):
        value = c.raw(aug + key, 0)
        c.drop(aug + key, "same: augmentation from the first to the last epoch" if value == 0 else
               f"epochs without augmentation at the {'start' if key == 'warmup' else 'end'} are not supported")


def convert_optimizer(c: Conversion) -> None:
    opt = "optimizer."
    name = str(c.raw(opt + "name", "adam")).lower()
    c.drop(opt + "name", "same: upstream's 'adam' was AdamW, as here" if name == "adam" else
           f"{name!r} is not available: AdamW is used here, with the learning rate and weight decay copied (tuned for "
           f"{name}: revisit them)")
    lr = None
    if c.has(opt + "lr"):
        lr = c.number(opt + "lr")
        c.set("train.lr", lr, opt + "lr", "upstream used one learning rate for every parameter")
        c.set("train.backbone_lr", lr, opt + "lr", "upstream used one learning rate for every parameter")
    if c.has(opt + "weight_decay"):
        c.set("train.weight_decay", c.number(opt + "weight_decay"), opt + "weight_decay",
              "not applied to biases and norms here (upstream: every parameter)")
    c.drop(opt + "weight_decouple", "upstream's code never read it; AdamW's decoupled decay is used")
    c.drop(opt + "eps", "AdamW's eps is PyTorch's default, 1e-8")
    for key, default in (("beta_1", 0.9), ("beta_2", 0.999)):
        if c.has(opt + key):
            same = c.number(opt + key) == default
            c.drop(opt + key, f"same: AdamW's {default} here" if same else "AdamW's betas are fixed at (0.9, 0.999) here")
    c.drop(opt + "use_8bit_adam", "8-bit Adam is not supported")
    mode = c.raw(opt + "mode", "cosine")
    if mode == "skip":  # upstream: no scheduler, a constant learning rate
        c.set("train.warmup_epochs", 0.0, opt + "mode", "mode skip: a constant learning rate")
        c.set("train.min_lr_ratio", 1.0, opt + "mode", "mode skip: a constant learning rate")
        c.drop_all(opt + "decay", "no schedule with optimizer.mode skip")
        return
    c.drop(opt + "mode", "same: linear warm-up, then cosine decay" if mode == "cosine" else
           f"{mode!r}: not an upstream mode; the cosine schedule is used")
    batch = c.number("train_settings.batch_size", int, 16)
    if c.has(opt + "decay.warmup"):
        steps = c.number(opt + "decay.warmup", int)
        per_epoch = math.ceil(TRAIN_PROTEINS / batch)
        c.set("train.warmup_epochs", float(f"{steps / per_epoch:.4g}"), opt + "decay.warmup",
              f"upstream counted {steps} steps; here epochs: approximately {steps} / {per_epoch} steps per epoch "
              f"({TRAIN_PROTEINS} training proteins of fold 0, batch {batch}, before augmentation copies)")
    if c.has(opt + "decay.min_lr") and lr:
        min_lr = c.number(opt + "decay.min_lr")
        c.set("train.min_lr_ratio", float(f"{min(max(min_lr / lr, 0.0), 1.0):.12g}"), opt + "decay.min_lr",
              f"min_lr {min_lr:g} / lr {lr:g}")
    elif c.has(opt + "decay.min_lr"):
        c.drop(opt + "decay.min_lr", "needs optimizer.lr to become a ratio")
    cycle = c.raw(opt + "decay.first_cycle_steps", None)
    restarts = c.raw(opt + "decay.num_restarts", 1)
    c.drop(opt + "decay.first_cycle_steps", "same: one cosine cycle over the whole run" if cycle is None and restarts == 1
           else f"a cosine cycle of {cycle} steps with restarts has no equivalent: one cycle spans the run here")
    c.drop(opt + "decay.num_restarts", "same: one cycle (the cycle length is reported under first_cycle_steps)"
           if restarts == 1 else "restarts are not supported: one cosine cycle spans the run here")
    c.drop(opt + "decay.gamma", "the peak decay between restarts; no restarts here")


def convert_supcon(c: Conversion) -> None:
    if not any(key.startswith("supcon.") for key in c.up):
        return
    for key, kind in (("apply", bool), ("n_pos", int), ("n_neg", int), ("temperature", float), ("hard_neg", bool),
                      ("weight", float), ("warm_start", int), ("apply_supcon_loss", bool), ("drop_out", float)):
        if c.has(f"supcon.{key}"):
            value = c.flag(f"supcon.{key}") if kind is bool else c.number(f"supcon.{key}", kind)
            note = ""
            if key == "hard_neg" and value:
                note = ("upstream read distance_map.txt from the working directory; here the map is built from the "
                        "initial model, or set supcon.distance_map (scripts/build_distance_map.py)")
            elif key == "warm_start":
                note = "epochs before this one train the contrastive loss only, as upstream"
            c.set(f"supcon.{key}", value, f"supcon.{key}", note)
    for key, value in UPSTREAM_PROJECTION.items():
        c.set(f"supcon.{key}", value, "(implied)", "the SupCon branch's projection head size (LayerNormNet defaults)")
    skip = c.raw("supcon.skip_esm", False)
    c.drop("supcon.skip_esm", "same: the backbone runs" if skip is False else
           "precomputed protein embeddings instead of the backbone are not supported; the nearest is "
           "encoder.tune: frozen with encoder.cache_frozen: true")
    c.drop("supcon.device", "device: auto")


def convert_decoder(c: Conversion) -> None:
    if c.has("decoder.droprate"):
        c.set("decoder.dropout", c.number("decoder.droprate"), "decoder.droprate",
              "dropout of the per-residue heads (upstream's CNN decoder has no other equivalent)")
    c.drop("decoder.combine", "class scores always come from a classifier over the pooled embedding here "
                              "(upstream combine: true derived them from the motif tracks)")
    c.drop_all("decoder", "this project's decoder is one per-residue MLP per class (decoder.hidden_dim) plus a "
                          "linear classifier; upstream's CNN / multi-scale CNN decoders have no equivalent")


def convert(upstream: dict, where: str) -> Conversion:
    """Translate an upstream config tree; every upstream key ends up translated or dropped."""
    if not isinstance(upstream, dict) or not upstream:
        raise ConversionError(f"{where}: expected a mapping of upstream config keys at top level")
    c = Conversion(upstream, where)
    convert_top(c)
    convert_encoder(c)
    convert_train(c)
    convert_optimizer(c)
    convert_supcon(c)
    convert_decoder(c)
    c.set("log.tensorboard", True, "(implied)", "upstream always logged to TensorBoard")
    for key in c.up:
        if key not in c.handled():
            c.drop(key, "not a key of any upstream MUTarget config this converter knows")
    try:
        resolve_config(c.tree, where=f"{where} (converted)")
    except ConfigError as err:
        raise ConversionError(f"{err}") from None
    return c


# --------------------------------------------------------------------------- output
def scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def ordered(tree: dict, defaults: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) leaves of `tree` in the order of config.DEFAULTS; blocks as (key, None)."""
    rows = []
    for key in list(defaults) + [k for k in tree if k not in defaults]:
        if key not in tree:
            continue
        value = tree[key]
        if isinstance(value, dict):
            rows.append((prefix + key, None))
            rows.extend(ordered(value, defaults.get(key) or {}, prefix + key + "."))
        else:
            rows.append((prefix + key, value))
    return rows


def render(c: Conversion, source: str) -> str:
    """OUT.yaml: header, the untranslated keys as comments, then the keys with their sources."""
    lines = [f"# Converted from the upstream MUTarget config {source} by scripts/convert_upstream_config.py.",
             "# Keys not set here take this project's defaults (docs/configuration.md).",
             "# Upstream keys not translated:"]
    by_reason: dict = {}
    for key, reason in c.dropped.items():
        by_reason.setdefault(reason, []).append(key)
    lines += [f"#   {', '.join(keys)}: {reason}" for reason, keys in by_reason.items()] or ["#   (none)"]
    for key, value in ordered(c.tree, DEFAULTS):
        depth = key.count(".")
        leaf = key.rpartition(".")[2]
        if value is None:
            lines.append(f"{'  ' * depth}{leaf}:")
            continue
        line = f"{'  ' * depth}{leaf}: {scalar(value)}"
        origin = c.sources[key]
        lines.append(f"{line:<40} # {'upstream ' + origin if origin != '(implied)' else 'implied by upstream'}")
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != c.tree:
        raise AssertionError("rendered YAML does not read back as the converted config")
    return text


def report(c: Conversion) -> str:
    rows = ["translated (upstream -> here):"]
    for source, ours, value, note in c.translated:
        rows.append(f"  {source} -> {ours}: {scalar(value)}" + (f"  ({note})" if note else ""))
    rows.append(f"not translated ({len(c.dropped)} upstream keys):")
    rows += [f"  {key} = {scalar(c.up[key])}: {reason}" for key, reason in c.dropped.items()]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("upstream", help="upstream MUTarget YAML config")
    p.add_argument("out", help="this project's config to write")
    args = p.parse_args(argv)
    path = Path(args.upstream)
    try:
        if not path.is_file():
            raise ConversionError(f"{path}: file not found")
        try:
            tree = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConversionError(f"{path}: invalid YAML ({err})") from None
        conversion = convert(tree, str(path))
        text = render(conversion, path.name)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, text)
    print(report(conversion))
    print(f"wrote {args.out}; train with: python train.py --config {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
