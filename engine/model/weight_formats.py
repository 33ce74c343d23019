"""The one table of weight formats: what each costs in memory, how its quantized values decode, and which ones a
user may ask a layer to run at. Imports neither torch nor numpy, so the planner reads it too.

A quantized format stores each weight as an unsigned integer q of `bits` bits and decodes it as

    w = d * sc * (q - zero) + dmin * mn

where d (and dmin) are fp16 scales per `group` inputs (direct formats), or per 256-input super-block with int8
sub-scales sc and mn per group (the K-quants; a matrix's last super-block may be partial). Absent parts read as one (sc, mn) or zero (dmin). This is every
GGUF format the engine runs natively, in the engine's own packed layout (engine.model.quantized), with the
values GGUF stores: a GGUF file's tensors keep their exact weights.
"""
from __future__ import annotations

from dataclasses import dataclass

SUPER_BLOCK = 256  # inputs per super-block of the K-quants


@dataclass(frozen=True, slots=True)
class WeightFormat:
    name: str  # as users write it: "q4_k", "bfloat16"
    ggml_type: str  # the GGUF tensor type it reads natively ("Q4_K"; safetensors names its floats alike)
    bits: int  # bits per stored value: 16/32 for float formats
    group: int = 0  # inputs per scale
    zero: int = 0
    has_min: bool = False
    sub_scales: bool = False

    def __reduce__(self):
        # One object per format: read back from a pickle, a format is the table's own entry, not a copy of it.
        return (format_named, (self.name,))

    @property
    def quantized(self) -> bool:
        return self.group > 0

    @property
    def bits_per_weight(self) -> float:
        """Memory per weight in the engine's layout, scales included."""
        if not self.quantized:
            return float(self.bits)
        scales = 2 if self.has_min else 1
        if self.sub_scales:  # int8 per group, fp16 per super-block
            return self.bits + 8 * scales / self.group + 16 * scales / SUPER_BLOCK
        return self.bits + 16 * scales / self.group

    @property
    def input_multiple(self) -> int:
        """A matrix's input size must be a multiple of this to be stored in the format. The K-quants' last
        super-block may be partial (a 576-wide matrix quantized here has two and a quarter): GGUF files, whose
        rows are whole super-blocks, read as they are."""
        return max(self.group, 32)


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("float32", "F32", 32),
    WeightFormat("bfloat16", "BF16", 16),
    WeightFormat("float16", "F16", 16),
    WeightFormat("q8_0", "Q8_0", 8, group=32, zero=128),  # int8 stored offset by 128
    WeightFormat("q6_k", "Q6_K", 6, group=16, zero=32, sub_scales=True),
    WeightFormat("q4_1", "Q4_1", 4, group=32, has_min=True),
    WeightFormat("q4_0", "Q4_0", 4, group=32, zero=8),
    WeightFormat("q4_k", "Q4_K", 4, group=32, has_min=True, sub_scales=True),
)}
QUANTIZED = tuple(name for name, f in FORMATS.items() if f.quantized)
# What a checkpoint's float weights can be quantized to at load (engine.model.quantized has their quantizers).
QUANTIZE_AT_LOAD = ("q8_0", "q4_0", "q4_1", "q4_k")
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
# --quantization's own words: keep each tensor as the checkpoint stores it; dequantize everything.
AUTO, NONE = "auto", "none"


def format_named(name: str) -> WeightFormat:
    return FORMATS[name]


def by_ggml_type(ggml_type: str) -> WeightFormat | None:
    """The format that holds a GGUF tensor type natively, if any."""
    return next((f for f in FORMATS.values() if f.ggml_type == ggml_type), None)


def check_requested(name: str, *, for_layer: bool = False) -> str:
    """A --quantization (or per-layer) value, canonical: auto, none, a float dtype or a format to quantize to."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in (AUTO, NONE) and not for_layer:
        return key
    if key in FORMATS and (not FORMATS[key].quantized or key in QUANTIZE_AT_LOAD):
        return key
    allowed = ([] if for_layer else [AUTO, NONE]) + [n for n in FORMATS if not FORMATS[n].quantized]
    raise ValueError(f"cannot quantize to {name!r}: choose one of {', '.join(allowed + list(QUANTIZE_AT_LOAD))}")


def parse_layer_formats(text: str | None, num_layers: int) -> dict[int, str]:
    """`0-3=bf16,4-29=q4_k` -> {layer: format}; each layer named at most once, every index within the model."""
    out: dict[int, str] = {}
    if not text:
        return out
    for part in text.split(","):
        span, sep, fmt = part.strip().partition("=")
        if not sep or not span or not fmt:
            raise ValueError(f"--layer-quantization: {part.strip()!r} is not RANGE=FORMAT (as in 0-3=bf16)")
        lo, dash, hi = span.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"--layer-quantization: {span!r} is not a layer or a range of layers") from None
        if not 0 <= first <= last < num_layers:
            raise ValueError(f"--layer-quantization: layers {span} are outside 0-{num_layers - 1}")
        fmt = check_requested(fmt, for_layer=True)
        for i in range(first, last + 1):
            if i in out:
                raise ValueError(f"--layer-quantization: layer {i} is named twice")
            out[i] = fmt
    return out


# The formats --precision may name, auto among them: a stage's choices are count vectors over them, as many as
# layers^(formats - 1), so a 126-layer model on four devices plans in about 9 s with three (2 cores), minutes with
# four.
MAX_PRECISION_CHOICES = 3


def parse_precision(text: str | None) -> tuple[str, ...] | None:
    """--precision: the formats the planner may choose per layer, "auto,q8_0,q4_k" -> ("auto", "q8_0", "q4_k").
    auto (the checkpoint's own) is always among them; None where none was given."""
    if not text:
        return None
    names = [AUTO]
    for part in text.split(","):
        key = ALIASES.get(part.strip().lower(), part.strip().lower())
        if key == AUTO:
            continue
        if key not in QUANTIZE_AT_LOAD:
            raise ValueError(f"--precision: {part.strip()!r} is not a format a layer can be chosen to run at: choose "
                             f"from auto (the checkpoint's own), {', '.join(QUANTIZE_AT_LOAD)}")
        if key in names:
            raise ValueError(f"--precision: {key} is named twice")
        names.append(key)
    if len(names) > MAX_PRECISION_CHOICES:
        raise ValueError(f"--precision: at most {MAX_PRECISION_CHOICES - 1} formats besides auto (the planner's search "
                         f"grows with the number of layers to the power of the formats), got {', '.join(names[1:])}")
    return tuple(names)


def describe_layers(formats: list[str]) -> str:
    """Layer formats in runs: ["q4_k", "q4_k", "bfloat16"] -> "0-1 q4_k, 2 bfloat16"."""
    runs: list[tuple[int, int, str]] = []
    for i, f in enumerate(formats):
        if runs and runs[-1][2] == f:
            runs[-1] = (runs[-1][0], i, f)
        else:
            runs.append((i, i, f))
    return ", ".join(f"{a}-{b} {f}" if a != b else f"{a} {f}" for a, b, f in runs)


def product_names(cfg) -> dict[str, int | None]:
    """The weights of a model's matrix products (Hugging Face names) -> their layer (None: the LM head).
    cfg: engine.model.config.ModelConfig."""
    out: dict[str, int | None] = {}
    for i in range(cfg.num_layers):
        for part in cfg.product_parts(i):
            out[f"model.layers.{i}.{part}.weight"] = i
    out["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"] = None
    return out


EMBEDDING = "model.embed_tokens.weight"


def tensor_formats(products: dict[str, int | None], in_features: dict[str, int], stored: dict[str, str],
                   quantization: str, per_layer: dict[int, str], tied: bool) -> dict[str, str]:
    """Which tensors do not run at the stage's own weight dtype, and what they run at.

    products: product_names(); in_features: each product's input size; stored: each tensor's stored type ("Q4_K",
    "BF16"; absent for a config alone). A type not in FORMATS has no kernel and is dequantized at load.
    A layer runs at per_layer's format where named, else at `quantization`'s, the LM head at `quantization`'s:
    auto keeps what the checkpoint stores where a kernel runs it, none dequantizes. An untied embedding stays
    quantized where stored so (its rows decode on lookup), and is never quantized at load."""
    out: dict[str, str] = {}
    for name, layer in products.items():
        requested = per_layer.get(layer, quantization) if layer is not None else quantization
        native = by_ggml_type(stored.get(name, ""))
        if requested == AUTO:
            if native is not None and native.quantized:
                out[name] = native.name
        elif requested != NONE:
            fmt = FORMATS[requested]
            if fmt.quantized and in_features[name] % fmt.input_multiple:
                raise ValueError(f"{name}: {fmt.name} needs an input size that is a multiple of {fmt.input_multiple}, "
                                 f"and this matrix has {in_features[name]}")
            out[name] = fmt.name
    if not tied and quantization == AUTO:
        native = by_ggml_type(stored.get(EMBEDDING, ""))
        if native is not None and native.quantized:
            out[EMBEDDING] = native.name
    return out


def layer_summary(cfg, formats: dict[str, str], weight_dtype: str) -> list[str]:
    """Per layer, what its products run at ("q4_k", or "q4_k+q6_k" where they differ)."""
    seen: list[list[str]] = [[] for _ in range(cfg.num_layers)]
    for name, layer in product_names(cfg).items():
        if layer is not None:
            fmt = formats.get(name, weight_dtype)
            if fmt not in seen[layer]:
                seen[layer].append(fmt)
    return ["+".join(s) for s in seen]


def dominant_quantized(formats: dict[str, str], cfg) -> str | None:
    """The quantized format at least half of the layers' products run at (None where none does): the one whose
    speed the probe times."""
    counts: dict[str, int] = {}
    layer_products = 0
    for name, layer in product_names(cfg).items():
        if layer is not None:
            layer_products += 1
            if name in formats:
                counts[formats[name]] = counts.get(formats[name], 0) + 1
    best = max(counts, key=counts.get, default=None)
    return best if best is not None and FORMATS[best].quantized and 2 * counts[best] >= layer_products else None
