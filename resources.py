"""What a configuration asks of the machine, estimated from the configuration alone, before data or model are
built: the model's parameters and the SupCon embedding queue. config.resolve_config refuses a configuration whose
estimate is above a bound no machine this project targets has (fixed bounds: the same answer on every machine,
so a configuration that trained somewhere also loads everywhere).

Every section is counted as if it were switched on (the projection and cluster heads without supcon.apply; with
an encoder.tune other than lora or adapter, the larger of the two), as the key checks treat them. A backbone of
unknown size (encoder.checkpoint, a model name outside ESM2_SHAPES) counts as embed_dim 0: the figures are then
lower bounds, and a refusal still certain.

Not estimated here: memory per step (it depends on the proteins' lengths; memory.py plans the backbone's) and
the frozen-layer cache (it depends on the number of windows in the data; about tokens x d x 4 bytes).
"""
from __future__ import annotations

import re

PARAMS_MAX = 20 * 10 ** 9  # ESM-2 15B, the largest model this project trains, has 15.0 billion
DEVICE_BYTES_MAX = 200 * 10 ** 9  # above any one GPU's memory (the largest: 192 GB; H100 80 GB, H200 141 GB)
NUM_CLASSES = 8  # vocab.CLASSES (not imported: this module reads nothing but the configuration)
# fair-esm's ESM-2 models by layer count: (embed_dim, attention_heads)
ESM2_SHAPES = {6: (320, 20), 12: (480, 20), 30: (640, 20), 33: (1280, 20), 36: (2560, 40), 48: (5120, 40)}
ESM2_NAME = re.compile(r"(?:^|/)esm2_t(\d+)_\w+$")


def backbone_shape(enc: dict) -> tuple[int, int, int] | None:
    """(num_layers, embed_dim, attention_heads) of the configured backbone: encoder.scratch, or a fair-esm /
    Hugging Face ESM-2 name; None when only the weights know (encoder.checkpoint, other names)."""
    if enc.get("scratch") is not None:
        s = enc["scratch"]
        return s["num_layers"], s["embed_dim"], s["attention_heads"]
    match = ESM2_NAME.search(enc.get("model_name") or "")
    if match and int(match.group(1)) in ESM2_SHAPES:
        layers = int(match.group(1))
        return (layers, *ESM2_SHAPES[layers])
    return None


def backbone_parameters(num_layers: int, d: int) -> int:
    """fair-esm's ESM2 as model.Encoder keeps it: per layer q, k, v, out (4 d^2 + 4 d), the feed-forward
    d -> 4 d -> d (8 d^2 + 5 d) and two layer norms (4 d); the token embedding (33 d) and final norm (2 d); the LM
    and contact heads are dropped."""
    return num_layers * (12 * d * d + 13 * d) + 35 * d


def parameter_parts(config: dict) -> dict:
    """{key: (parameters, description)} of the model's parts, each under the key that sizes it."""
    enc, dec, sc = config["encoder"], config["decoder"], config["supcon"]
    shape = backbone_shape(enc)
    layers, d, heads = shape or (0, 0, 0)
    parts = {}
    if enc.get("scratch") is not None:
        parts["encoder.scratch"] = (backbone_parameters(layers, d),
                                    f"encoder.scratch (num_layers {layers}, embed_dim {d}, attention_heads {heads})")
    elif shape is not None:
        parts["encoder.model_name"] = (backbone_parameters(layers, d), f"encoder.model_name {enc['model_name']}")
    adapted = layers if enc["trainable_layers"] == 0 else min(enc["trainable_layers"], layers)
    per_rank = sum(2 * d if t in ("q", "k", "v", "out") else 5 * d for t in enc["lora"]["targets"])
    dim = enc["adapter"]["dim"]
    peft = {"encoder.lora.rank": (adapted * per_rank * enc["lora"]["rank"],
                                  f"encoder.lora.rank {enc['lora']['rank']} (on {adapted} layers)"),
            "encoder.adapter.dim": (adapted * 2 * (2 * d * dim + dim + d),  # after attention and feed-forward
                                    f"encoder.adapter.dim {dim} (on {adapted} layers)")}
    on = {"lora": "encoder.lora.rank", "adapter": "encoder.adapter.dim"}.get(enc["tune"])
    on = on or max(peft, key=lambda k: peft[k][0])  # another tune: the larger, as if it were on
    parts[on] = peft[on]
    h = dec["hidden_dim"]
    parts["decoder.hidden_dim"] = ((NUM_CLASSES * (d * h + 2 * h + 1) if h else NUM_CLASSES * (d + 1))
                                   + NUM_CLASSES * (d + 1), f"decoder.hidden_dim {h} (x {NUM_CLASSES} classes)")
    ph, out = sc["hidden_dim"], sc["out_dim"]
    parts["supcon.hidden_dim"] = (d * ph + ph * ph + ph * out + 6 * ph + out,
                                  f"supcon.hidden_dim {ph} (the projection head)")
    parts["supcon.n_clusters"] = (out * sc["n_clusters"] + sc["n_clusters"],
                                  f"supcon.n_clusters {sc['n_clusters']} (the cluster head)")
    return parts


def size_text(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.0f} bytes"


def problems(config: dict) -> list[tuple[tuple, str]]:
    """What no targeted machine can hold: [(keys to blame, message)] (empty when all fits the bounds)."""
    found = []
    parts = parameter_parts(config)
    total = sum(n for n, _ in parts.values())
    if total > PARAMS_MAX:
        key = max(parts, key=lambda k: parts[k][0])
        found.append(((key,), f"{parts[key][1]} makes a model of {total / 1e9:.1f} billion parameters "
                              f"({size_text(4 * total)} of float32 weights, {size_text(16 * total)} with gradients "
                              f"and AdamW's state); this project trains at most {PARAMS_MAX / 1e9:.0f} billion "
                              f"(ESM-2 15B, the largest ESM-2, has 15.1 billion)"))
    sc = config["supcon"]
    queue = sc["queue_size"] * (sc["out_dim"] + NUM_CLASSES) * 4
    if queue > DEVICE_BYTES_MAX:
        found.append((("supcon.queue_size", "supcon.out_dim"),
                      f"supcon.queue_size {sc['queue_size']} needs {size_text(queue)} for the embedding queue "
                      f"(queue_size x (supcon.out_dim {sc['out_dim']} + {NUM_CLASSES} labels) x 4 bytes, on the "
                      f"training device); at most {size_text(DEVICE_BYTES_MAX)}, more than any one GPU holds"))
    return found
