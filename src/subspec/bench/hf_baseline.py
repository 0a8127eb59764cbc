"""Baseline for `bench`: Hugging Face transformers + accelerate disk offload under a memory budget.

This is what a Python user would do today: build a ``device_map`` that keeps what fits on
"cpu" and puts the remaining decoder layers on "disk", then ``from_pretrained`` with it.
accelerate then loads each disk layer's weights on every forward (through hooks) and drops
them afterwards.

Budget accounting mirrors subspec's planner: the budget pays for the resident weights
(embeddings, final norm, LM head, the first decoder layers), staging for the largest
streamed module (accelerate's hooks load a disk layer one linear or norm at a time and drop
each after use), and an allowance for the KV cache and activations (``runtime_allowance``).
The interpreter and libraries are not counted.

The page cache: with RAM to spare the kernel would serve the "disk" layers from memory and
the comparison would be meaningless. So after each forward of a disk layer its bytes are
evicted with ``posix_fadvise(DONTNEED)`` (every offloaded file once after loading), and the
bytes the process actually read from storage during generation are reported. transformers 5
does not copy safetensors weights into the offload folder: the offload index points straight
into the checkpoint, so the evicted bytes live in the checkpoint's own shards (``.dat`` files
in the offload folder for accelerate's own format).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from subspec.errors import SubspecError
from subspec.files import read_safetensors_header
from subspec.memory import peak_rss_bytes, reset_peak_rss
from subspec.progress import quiet_libraries

Range = tuple[str, int, int]  # (file, offset, length)


def run_hf(
    model_dir: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    budget_bytes: int | None,
    dtype: torch.dtype,
    offload_dir: Path,
    eos_ids: set[int],
    evict: bool = True,
) -> dict:
    """Greedy-decode each prompt (batch 1) with HF transformers + accelerate disk offload.

    ``evict=False`` leaves the page cache alone (to measure what eviction costs). Returns
    outputs, timings (prefill = first forward, decode = the rest; ``tokens_per_s`` counts
    decode tokens only, as bench does), peak RSS during generation, ``bytes_offloaded``
    (stored bytes read from disk on every forward pass), the placement and what was evicted.
    """
    from transformers import AutoConfig

    quiet_libraries()  # for the whole baseline: its loads draw no bars, log no warnings
    config = AutoConfig.from_pretrained(model_dir)
    longest = max((len(p) for p in prompts), default=0)
    allowance = runtime_allowance(config, dtype, longest + max_new_tokens, longest)
    device_map, placement = plan_device_map(config, dtype, budget_bytes, allowance)
    offload_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hf-offload-", dir=offload_dir))
    try:
        result = _run(model_dir, dtype, device_map, work, (prompts, max_new_tokens, eos_ids), evict)
    finally:
        gc.collect()  # the eviction hooks and the model form a cycle
        shutil.rmtree(work, ignore_errors=True)
    result["placement"] = placement
    return result


def _run(model_dir, dtype, device_map, work: Path, job: tuple, evict: bool) -> dict:
    model = _load(model_dir, dtype, device_map, work)
    evictor = PageCacheEvictor(model, device_map, work)
    if evict:
        evictor.install()
    read_before = disk_read_bytes()
    result = _generate_all(model, *job)
    offload = evictor.report(evict)
    offload["disk_read_bytes"] = disk_read_bytes() - read_before  # during generation
    offload["disk_read_bytes_per_pass"] = offload["disk_read_bytes"] / max(result["new_tokens"], 1)
    result["offload"] = offload
    result["bytes_offloaded"] = evictor.bytes_per_pass
    return result


def runtime_allowance(config, dtype: torch.dtype, max_len: int, prompt_len: int) -> int:
    """Bytes reserved for the KV cache and the largest transient activations.

    KV cache: K and V for every layer over ``max_len`` positions. Prefill activations over
    ``prompt_len`` tokens: the MLP's gate/up/act tensors, a few hidden-state copies and one
    attention-score matrix per head; plus float32 logits for the last position.
    """
    elt = torch.empty((), dtype=dtype).element_size()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * max_len * elt
    mlp = 3 * prompt_len * config.intermediate_size * elt
    hidden = 4 * prompt_len * config.hidden_size * elt
    scores = heads * prompt_len * prompt_len * elt
    return kv + mlp + hidden + scores + 2 * config.vocab_size * 4


def plan_device_map(
    config, dtype: torch.dtype, budget_bytes: int | None, allowance: int
) -> tuple[dict[str, str], dict]:
    """A ``device_map`` keeping non-layer weights and the first layers on "cpu", rest on "disk".

    Returns the map and a placement summary. Raises SubspecError when not even the non-layer
    weights, the staging room and the allowance fit.
    """
    model = _meta_model(config, dtype)
    layers_name = _layers_name(model, config.num_hidden_layers)
    layers = model.get_submodule(layers_name)
    layer_bytes = [_nbytes(m) for m in layers]
    fixed = _nbytes(model) - sum(layer_bytes)
    staging = max(_nbytes(m) for m in layers.modules() if not list(m.children()))
    n_cpu = _resident_layers(fixed + allowance, layer_bytes, staging, budget_bytes)
    device_map = _device_map(model, layers_name, n_cpu)
    cpu_bytes = fixed + sum(layer_bytes[:n_cpu])
    placement = {
        "cpu_bytes": cpu_bytes,
        "disk_bytes": sum(layer_bytes[n_cpu:]),
        "staging_bytes": staging if n_cpu < len(layer_bytes) else 0,
        "allowance_bytes": allowance,
        "budget_bytes": budget_bytes,
        "cpu_layers": n_cpu,
        "disk_layers": len(layer_bytes) - n_cpu,
        "device_map_summary": _summary(device_map, layers_name, n_cpu, len(layer_bytes)),
        "device_map": device_map,
    }
    return device_map, placement


def _meta_model(config, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _layers_name(model, num_layers: int) -> str:
    """The dotted name of the ModuleList holding the decoder layers."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return name
    raise SubspecError(f"cannot find the {num_layers} decoder layers in {type(model).__name__}")


def _nbytes(module: torch.nn.Module) -> int:
    """Parameter bytes, each shared (tied) parameter counted once."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _resident_layers(fixed: int, layers: list[int], staging: int, budget: int | None) -> int:
    """How many leading layers fit in ``budget`` with ``fixed`` (and ``staging`` if any streams)."""
    if budget is None or fixed + sum(layers) <= budget:
        return len(layers)
    room = budget - fixed - staging
    if room < 0:
        raise SubspecError(
            f"memory budget {budget} bytes is below the HF baseline's minimum of "
            f"{fixed + staging} bytes (non-layer weights, staging, KV cache and activations)"
        )
    n = 0
    while n < len(layers) and room >= layers[n]:
        room -= layers[n]
        n += 1
    return n


def _device_map(model, layers_name: str, n_cpu: int) -> dict[str, str]:
    """Every top-level part on "cpu", decoder layer i on "cpu" if i < n_cpu else "disk"."""
    device_map: dict[str, str] = {}

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == layers_name:
                for i in range(len(child)):
                    device_map[f"{full}.{i}"] = "cpu" if i < n_cpu else "disk"
            elif layers_name.startswith(full + "."):
                visit(full + ".", child)
            else:
                device_map[full] = "cpu"

    visit("", model)
    return device_map


def _summary(device_map: dict[str, str], layers_name: str, n_cpu: int, n: int) -> str:
    parts = [k for k in device_map if not k.startswith(layers_name + ".")]
    if n_cpu:
        parts.append(f"{layers_name}.0-{n_cpu - 1}")
    disk = f"; {layers_name}.{n_cpu}-{n - 1} on disk" if n_cpu < n else ""
    return f"{', '.join(parts)} on cpu{disk}"


def _load(model_dir: Path, dtype: torch.dtype, device_map: dict[str, str], offload_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map=device_map, offload_folder=str(offload_dir)
    )
    return model.eval()


class PageCacheEvictor:
    """Drops each disk-offloaded layer's bytes from the page cache after the layer runs.

    A layer is evicted as the span of its tensors in each file, widened to 2 MiB boundaries:
    the page cache holds large folios (up to 2 MiB, naturally aligned) and ``DONTNEED`` skips
    any folio reaching outside the given range, so the exact tensor ranges leave the layer
    cached. Evicting whole files is worse: transformers 5 keeps the resident weights as a
    private memory map of the checkpoint, whose pages whole-file eviction also drops, and the
    process then read about twice the offloaded bytes per pass.
    """

    def __init__(self, model, device_map: dict[str, str], offload_dir: Path):
        self.modules = {n: model.get_submodule(n) for n, d in device_map.items() if d == "disk"}
        self.ranges = {n: _module_ranges(m, n, offload_dir) for n, m in self.modules.items()}
        self.bytes_per_pass = sum(length for rs in self.ranges.values() for _, _, length in rs)
        self.files = sorted({path for rs in self.ranges.values() for path, _, _ in rs})
        self.calls = 0
        self.evicted_bytes = 0  # offloaded bytes covered by the evictions

    def install(self) -> None:
        """Flush and evict every offloaded file now, and a layer's bytes after each forward."""
        for path in self.files:
            self._fadvise(path, 0, 0, flush=True)
        for name, module in self.modules.items():
            spans = _spans(self.ranges[name])
            nbytes = sum(length for _, _, length in self.ranges[name])
            module.register_forward_hook(lambda *_, s=spans, n=nbytes: self._evict(s, n))

    def _evict(self, spans: list[Range], nbytes: int) -> None:
        for path, offset, length in spans:
            self._fadvise(path, offset, length)
        self.evicted_bytes += nbytes

    def _fadvise(self, path: str, offset: int, length: int, flush: bool = False) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if flush:
                os.fsync(fd)  # DONTNEED cannot drop dirty pages (e.g. a just-written file)
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        self.calls += 1

    def report(self, evicting: bool) -> dict:
        """What was done to the page cache."""
        how = (
            "posix_fadvise(POSIX_FADV_DONTNEED) on each disk layer's files after each of its "
            "forwards (forward hook), and on every offloaded file once after loading"
            if evicting
            else "none: the page cache may serve the offloaded weights"
        )
        return {
            "how": how,
            "evicted_bytes": self.evicted_bytes,
            "fadvise_calls": self.calls,
            "offloaded_files": self.files,
        }


def _module_ranges(module, name: str, offload_dir: Path) -> list[Range]:
    """The file byte ranges accelerate reads to materialise ``module``'s offloaded weights."""
    loader = _offload_loader(module)
    if loader is None:
        raise SubspecError(f"{name} was placed on disk but accelerate attached no offload hook")
    ranges = []
    for key, info in loader.index.items():
        if not key.startswith(name + "."):
            continue
        if info.get("safetensors_file"):
            path = info["safetensors_file"]
            offset, length = _safetensors_span(path, info.get("weight_name", key))
            ranges.append((path, offset, length))
        else:
            path = os.path.join(loader.save_folder or offload_dir, f"{key}.dat")
            ranges.append((path, 0, os.path.getsize(path)))
    return ranges


def _spans(ranges: list[Range], align: int = 2 << 20) -> list[Range]:
    """Per file, one range covering all of ``ranges`` in it, widened to ``align`` boundaries."""
    bounds: dict[str, tuple[int, int]] = {}
    for path, offset, length in ranges:
        lo, hi = bounds.get(path, (offset, offset + length))
        bounds[path] = (min(lo, offset), max(hi, offset + length))
    spans = []
    for path, (lo, hi) in bounds.items():
        start, end = lo // align * align, (hi + align - 1) // align * align
        spans.append((path, start, end - start))
    return spans


def _offload_loader(module):
    """accelerate's OffloadedWeightsLoader behind the offload hooks in ``module`` (or None).

    accelerate hooks the leaves of a disk block (each linear and norm loads its own weights
    just before it runs); they all share one loader.
    """
    for sub in module.modules():
        weights_map = getattr(getattr(sub, "_hf_hook", None), "weights_map", None)
        if weights_map is not None:
            return weights_map.dataset
    return None


def _safetensors_span(path: str, tensor: str) -> tuple[int, int]:
    """(file offset, length) of ``tensor``'s data in a safetensors file."""
    n, header = read_safetensors_header(Path(path))
    begin, end = header[tensor]["data_offsets"]
    return 8 + n + begin, end - begin


def disk_read_bytes() -> int:
    """Bytes this process has made the kernel read from storage (``/proc/self/io``), or 0."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _generate_all(model, prompts: list[list[int]], max_new: int, eos_ids: set[int]) -> dict:
    outputs, prefill_s, decode_s, peak = [], 0.0, 0.0, 0
    for prompt in prompts:
        reset_peak_rss()
        tokens, pre, dec = greedy(model, prompt, max_new, eos_ids)
        peak = max(peak, peak_rss_bytes())
        outputs.append(tokens)
        prefill_s += pre
        decode_s += dec
    new_tokens = sum(len(t) for t in outputs)
    decode_tokens = sum(max(len(t) - 1, 0) for t in outputs)
    return {
        "outputs": outputs,
        "new_tokens": new_tokens,
        "decode_tokens": decode_tokens,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "peak_rss_bytes": peak,
    }


@torch.inference_mode()
def greedy(model, prompt: list[int], max_new: int, eos_ids: set[int]):
    """Greedy batch-1 decoding with the model's own KV cache.

    Returns (generated ids, prefill seconds = first forward, decode seconds = the rest).
    """
    from transformers import DynamicCache

    if max_new <= 0:
        return [], 0.0, 0.0
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt], dtype=torch.long)
    t0 = time.perf_counter()
    tokens = [_step(model, ids, cache)]
    t1 = time.perf_counter()
    while len(tokens) < max_new and tokens[-1] not in eos_ids:
        tokens.append(_step(model, torch.tensor([[tokens[-1]]]), cache))
    return tokens, t1 - t0, time.perf_counter() - t1


def _step(model, ids: torch.Tensor, cache) -> int:
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return int(out.logits[0, -1].argmax())
