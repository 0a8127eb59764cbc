"""Random-weight models of a named architecture: `--model dummy:NAME`.

Like vLLM's `--load-format dummy`, this lets people measure offloading on the shape of a model
they cannot download. `ensure_dummy` writes, once, a Hugging Face-style directory (config.json,
generation_config.json, bfloat16 safetensors shards with an index, and an offline tokenizer)
under `cache_root()/dummy/NAME`. The architectures are the public config.json values in
data/dummy_models.json.

Weights are seeded per (model name, tensor name), so two builds are byte-identical, and scaled
so a forward pass stays well-conditioned in bfloat16 at any depth: every projection has std
1/sqrt(fan_in) (unit-RMS outputs from unit-RMS inputs), the two residual branches' output
projections (o_proj, down_proj) are scaled down by a further 1/sqrt(2 * num_layers) so the
residual stream ends near RMS 1, embeddings and lm_head have std 1/sqrt(hidden) (logits of
std about 1), and norm weights are 1. The directory is built in a temporary directory and
renamed into place with its completion marker, so an interrupted build is never used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from subspec.errors import SubspecError
from subspec.files import MARKER, cache_root, replace_path, sweep_stale
from subspec.progress import StepLog

if TYPE_CHECKING:  # torch is imported when weights are drawn: resolving a name needs none
    import torch

PREFIX = "dummy:"
VERSION = 1  # bump when the weights or files a build writes change; older caches are rebuilt
_SHARD_BYTES = 2 * 10**9
_CHUNK = 1 << 24  # values drawn per randn call: 64 MB of float32 scratch
_BIAS_STD = 0.1  # small next to the unit-RMS projection outputs, large enough to matter
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# One tensor to write: Hugging Face name, shape, and the std of its normal draw (None: ones).
Spec = tuple[str, tuple[int, ...], float | None]


def catalog() -> dict[str, dict]:
    """The packaged dummy architectures (data/dummy_models.json), keyed by short name."""
    data = resources.files("subspec").joinpath("data/dummy_models.json")
    return json.loads(data.read_text(encoding="utf-8"))["models"]


def dummy_names() -> list[str]:
    """The names NAME that `dummy:NAME` accepts."""
    return list(catalog())


def is_dummy(spec: str) -> bool:
    """True for a model spec of the form `dummy:NAME` (known or not)."""
    return spec.startswith(PREFIX)


def dummy_dir(name: str, num_layers: int | None = None) -> Path:
    """Where the dummy `name` (optionally cut to `num_layers` layers) is cached."""
    suffix = "" if num_layers is None else f"-{num_layers}layers"
    return cache_root() / "dummy" / f"{name}{suffix}"


def is_built(path: Path) -> bool:
    """True when `path` holds a finished build of the current VERSION."""
    try:
        return json.loads((path / MARKER).read_text())["version"] == VERSION
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_dummy(name: str, *, progress: bool = True, num_layers: int | None = None) -> Path:
    """The directory of dummy model `name`, built on first use; `num_layers` is for tests.

    A `dummy:` prefix on `name` is accepted. An unknown name raises a one-line SubspecError
    listing the known ones; a failed or interrupted build leaves nothing that is used later.
    """
    name = name.removeprefix(PREFIX)
    models = catalog()
    if name not in models:
        known = ", ".join(PREFIX + n for n in models)
        raise SubspecError(f"unknown dummy model {name!r}; known: {known}")
    dst = dummy_dir(name, num_layers)
    if is_built(dst):
        return dst
    config = hf_config(models[name], num_layers)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dst.parent, dst.name)
    _check_free_space(dst, tensor_plan(config))
    say = StepLog(progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    try:
        _build(name, models[name], config, tmp / "out", say)
        _install(tmp / "out", dst, tmp)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SubspecError(f"disk full while writing dummy:{name} into {dst.parent}") from None
        raise SubspecError(f"writing dummy:{name} failed: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"dummy:{name} ready in {dst}")
    return dst


def _check_free_space(dst: Path, plan: list[Spec]) -> None:
    need = sum(_nbytes(shape) for _, shape, _ in plan) + 64 * 2**20  # + tokenizer, headroom
    free = shutil.disk_usage(dst.parent).free
    if free < need:
        raise SubspecError(
            f"not enough disk space for {dst.name}: needs about {need / 1e9:.1f} GB "
            f"in {dst.parent}, {free / 1e9:.1f} GB free"
        )


def _build(name: str, entry: dict, config: dict, out: Path, say) -> None:
    """Write the whole model directory into `out`, the completion marker last."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": entry["generation_eos"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    say(f"dummy:{name}: writing the tokenizer")
    tokenizer = build_tokenizer(config["vocab_size"], entry["special_tokens"])
    tokenizer.save_pretrained(out, save_jinja_files=False)  # the template in tokenizer_config
    write_weights(name, tensor_plan(config), out, say)
    marker = {"name": name, "version": VERSION, "layers": config["num_hidden_layers"]}
    (out / MARKER).write_text(json.dumps(marker) + "\n")


def _install(out: Path, dst: Path, tmp: Path) -> None:
    """Move the finished directory into place, unless another process finished first."""
    if is_built(dst):
        return
    replace_path(out, dst)  # over an older version's build, or a leftover without a marker


# ---------------------------------------------------------------- config and tensors


def hf_config(entry: dict, num_layers: int | None = None) -> dict:
    """The config.json of a dummy: the release's values, optionally cut to `num_layers`."""
    config = {**entry["config"], "hidden_act": "silu", "use_cache": True}
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    return config


def tensor_plan(config: dict) -> list[Spec]:
    """Every tensor of the checkpoint, in file order, with the std it is drawn with."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    plan: list[Spec] = [("model.embed_tokens.weight", (vocab, h), h**-0.5)]
    for i in range(config["num_hidden_layers"]):
        plan += _layer_plan(config, f"model.layers.{i}.")
    plan.append(("model.norm.weight", (h,), None))
    if not config.get("tie_word_embeddings", False):
        plan.append(("lm_head.weight", (vocab, h), h**-0.5))
    return plan


def _layer_plan(config: dict, prefix: str) -> list[Spec]:
    h, f = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    branch = (2 * config["num_hidden_layers"]) ** -0.5  # residual-branch output scale
    q = heads * d
    qkv = (("q", q), ("k", kv_heads * d), ("v", kv_heads * d))  # (projection, out features)
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    plan: list[Spec] = [(prefix + "input_layernorm.weight", (h,), None)]
    plan += [(f"{attn}{x}_proj.weight", (n, h), h**-0.5) for x, n in qkv]
    if config["model_type"] == "qwen2" or config.get("attention_bias", False):
        plan += [(f"{attn}{x}_proj.bias", (n,), _BIAS_STD) for x, n in qkv]
    if config["model_type"] == "qwen3":
        plan += [(attn + "q_norm.weight", (d,), None), (attn + "k_norm.weight", (d,), None)]
    plan.append((attn + "o_proj.weight", (h, q), branch * q**-0.5))
    plan.append((prefix + "post_attention_layernorm.weight", (h,), None))
    plan += [(mlp + "gate_proj.weight", (f, h), h**-0.5), (mlp + "up_proj.weight", (f, h), h**-0.5)]
    plan.append((mlp + "down_proj.weight", (h, f), branch * f**-0.5))
    return plan


def _nbytes(shape: tuple[int, ...]) -> int:
    return 2 * math.prod(shape)  # bfloat16


def shard_plan(plan: list[Spec], limit: int = _SHARD_BYTES) -> list[list[Spec]]:
    """Split the tensors, in order, into shards of at most `limit` bytes (one tensor at least)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in plan:
        n = _nbytes(spec[1])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def random_tensor(name: str, spec: Spec, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor in bfloat16: normal(0, std) seeded by (model, tensor) name, or ones.

    Values are drawn in float32 chunks of _CHUNK into `scratch` (allocated when not given;
    reusing one saves the page faults of a fresh 64 MB buffer per chunk).
    """
    import torch

    tensor_name, shape, std = spec
    if std is None:
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{name}/{tensor_name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    out = torch.empty(math.prod(shape), dtype=torch.bfloat16)
    scratch = torch.empty(_CHUNK) if scratch is None else scratch
    for start in range(0, out.numel(), _CHUNK):  # fixed chunks: the same draws every build
        chunk = out[start : start + _CHUNK]
        draw = torch.randn(chunk.numel(), generator=gen, out=scratch[: chunk.numel()])
        chunk.copy_(draw.mul_(std))
    return out.view(shape)


def write_weights(name: str, plan: list[Spec], out: Path, say) -> None:
    """Write `plan` as bfloat16 safetensors shards plus model.safetensors.index.json.

    One shard's tensors are in memory at a time (at most ~_SHARD_BYTES).
    """
    import torch
    from safetensors.torch import save_file

    shards = shard_plan(plan)
    weight_map, total = {}, 0
    scratch = torch.empty(_CHUNK)  # float32
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        size = sum(_nbytes(shape) for _, shape, _ in shard)
        say(f"dummy:{name}: shard {k}/{len(shards)} ({size / 1e9:.2f} GB)")
        tensors = {spec[0]: random_tensor(name, spec, scratch) for spec in shard}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys((spec[0] for spec in shard), file))
        total += size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(vocab_size: int, special_tokens: dict[str, int]):
    """A byte-level tokenizer covering ids 0..vocab_size-1, with ChatML and eos <|im_end|>.

    `special_tokens` sit at their given ids; the 256 byte symbols take the lowest free ids
    (every text encodes to one token per byte); every other id is a filler token `[ID]`, so
    any id a random model emits decodes to something visible.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    taken = set(special_tokens.values())
    free = (i for i in range(vocab_size) if i not in taken)
    vocab = dict(special_tokens)
    vocab.update(zip(sorted(pre_tokenizers.ByteLevel.alphabet()), free, strict=False))
    vocab.update((f"[{i}]", i) for i in free)
    if len(vocab) != vocab_size or max(taken) >= vocab_size:
        raise SubspecError(f"special tokens {special_tokens} do not fit a vocab of {vocab_size}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    pad = "<|endoftext|>" if "<|endoftext|>" in special_tokens else "<|im_end|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token=pad,
        additional_special_tokens=[t for t in special_tokens if t not in ("<|im_end|>", pad)],
        chat_template=CHATML_TEMPLATE,
    )
