"""CONTRACT TESTS of the NKI flash_fwd binding, against stand-ins of each Neuron SDK generation.

Nothing here runs on Inferentia or calls the real kernel: the Neuron SDK is not installable on
this machine. Stand-in modules are put into sys.modules, laid out as each generation's packages
are (release notes in aws-neuron/aws-neuron-sdk, kernel source history in aws-neuron/nki-samples):

- 2.20: `neuronxcc.nki.kernels.attention.flash_fwd(q, k, v, seed, o, lse=None, softmax_scale=None,
  use_causal_mask=True, mixed_precision=True, dropout_p=0.0, config=None)`, a plain function;
  FlashConfig(seq_tile_size, training, should_transpose_v); launched through
  `torch_neuronx.xla_impl.ops.nki_jit()(flash_fwd)[grid]`.
- 2.21-2.23: flash_fwd is `@nki.jit`, `(q, k, v, seed, logit_bias=None, softmax_scale=None, ...)`,
  returns o; FlashConfig adds attn_core_tile_size and lse_dtype; nki_jit still in torch-neuronx.
- 2.24-2.27: nki_jit gone from torch-neuronx; the kernel also with `sliding_window=-1` inserted
  before `mixed_precision`; 2.27 also ships the new `nki` package (NKI 0.2.0) beside neuronxcc.
- 2.28+: the `nki` package in its 2.28 layout (`nki.meta`).
Each stand-in kernel binds its arguments as Python would (a TypeError exactly as a real call),
applies the kernel's inference asserts, records the launch and computes o with the simulator of
the arithmetic its source has. The tests check what the binding sends: grid, argument order,
layouts, dtypes, FlashConfig, and which arithmetic it says the kernel has.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fuse_attn.commands.cli import main as cli_main
from fuse_attn.compile import binding
from fuse_attn.commands.compile import compile_main
from fuse_attn.compile.simulator import simulate_flash_fwd
from fuse_attn.ir.contract import FlashFwdAttrs
from test_compile_lower import fused_model

# The simulator's tensor ops run on one thread: on a shared 2-core machine two are slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclasses.dataclass(frozen=True)
class FlashConfig220:
    seq_tile_size: int = 2048
    training: bool = True
    should_transpose_v: bool = False


@dataclasses.dataclass(frozen=True)
class FlashConfig221:
    seq_tile_size: int = 2048
    attn_core_tile_size: int = 256
    training: bool = True
    should_transpose_v: bool = False
    lse_dtype: str = ""


class Launchable:
    """kernel[grid](*args, **kwargs): binds the arguments as Python would and records the launch."""

    def __init__(self, func, launches):
        self.func, self.launches = func, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = inspect.signature(self.func).bind(*args, **kwargs)  # TypeError exactly as a real call
            self.launches.append(dict(grid=tuple(grid), args=bound.arguments, positional=len(args)))
            return self.func(*args, **kwargs)

        return launch


def _kernel(q, k, v, seed, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config, config_type, version):
    """The inference asserts of flash_fwd's source, then the result in that source's arithmetic."""
    config = config or config_type()
    assert isinstance(config, config_type)
    b, h, d, n = q.shape
    kh = k.shape[1]
    assert tuple(k.shape) == (b, kh, d, n) and tuple(v.shape) == (b, kh, n, d)  # should_transpose_v=False layout
    assert d <= 128 and config.seq_tile_size >= 512 and n % config.seq_tile_size == 0 and n % 128 == 0
    assert not config.training, "lse should not be none for training"
    assert seed is None and dropout_p == 0.0
    assert q.dtype == k.dtype == v.dtype
    return simulate_flash_fwd(q, k, v, softmax_scale=softmax_scale, use_causal_mask=use_causal_mask,
                              mixed_precision=mixed_precision, seq_tile_size=config.seq_tile_size,
                              kernel_version=version)


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _packages(leaves: dict[str, types.ModuleType], versions: dict[str, str]) -> dict[str, types.ModuleType]:
    """The leaf modules with every parent package, linked as attributes the way imports link them."""
    modules = dict(leaves)
    for name in list(leaves):
        parts = name.split(".")
        for i in range(1, len(parts)):
            modules.setdefault(".".join(parts[:i]), _module(".".join(parts[:i])))
    for name, module in modules.items():
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, module)
        if name in versions:
            module.__version__ = versions[name]
    return modules


def _trace_standin(traces):
    def trace(module, example_inputs, compiler_args=None, **kwargs):
        traces.append(dict(example_inputs=example_inputs, compiler_args=compiler_args))
        return torch.jit.trace(module, example_inputs, check_trace=False)

    return trace


def sdk_220(launches, traces):
    def flash_fwd(q, k, v, seed, o, lse=None, softmax_scale=None, use_causal_mask=True, mixed_precision=True,
                  dropout_p=0.0, config=None):
        assert tuple(o.shape) == (q.shape[0], q.shape[1], q.shape[3], q.shape[2]) and o.dtype == q.dtype
        assert lse is None, "lse should be none for inference"
        o.copy_(_kernel(q, k, v, seed, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config,
                        FlashConfig220, "2.20"))

    return _packages({
        "neuronxcc.nki.kernels.attention": _module("attention", flash_fwd=flash_fwd, FlashConfig=FlashConfig220),
        "neuronxcc.nki": _module("neuronxcc.nki", trace=lambda f: f, jit=lambda f: Launchable(f, launches)),
        "torch_neuronx.xla_impl.ops": _module("ops", nki_jit=lambda: (lambda func: Launchable(func, launches))),
        "torch_neuronx": _module("torch_neuronx", trace=_trace_standin(traces)),
    }, {"neuronxcc": "2.15.128.0", "torch_neuronx": "2.1.2.2.3.0"})


def _flash_fwd_221(sliding_window: bool, logit_bias: bool = True):
    if not logit_bias:  # the signature nki-samples issue #52 calls (no logit_bias yet)
        def flash_fwd(q, k, v, seed, softmax_scale=None, use_causal_mask=True, mixed_precision=True, dropout_p=0.0,
                      config=None):
            return _kernel(q, k, v, seed, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config,
                           FlashConfig221, "2.21")
    elif sliding_window:  # nki-samples 060228e on
        def flash_fwd(q, k, v, seed, logit_bias=None, softmax_scale=None, use_causal_mask=True, sliding_window=-1,
                      mixed_precision=True, dropout_p=0.0, config=None):
            assert logit_bias is None and sliding_window == -1
            return _kernel(q, k, v, seed, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config,
                           FlashConfig221, "2.21-swa")
    else:  # nki-samples 05c0769 (SDK 2.21)
        def flash_fwd(q, k, v, seed, logit_bias=None, softmax_scale=None, use_causal_mask=True, mixed_precision=True,
                      dropout_p=0.0, config=None):
            assert logit_bias is None
            return _kernel(q, k, v, seed, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config,
                           FlashConfig221, "2.21")
    return flash_fwd


def sdk_221(launches, traces, *, nki_jit_in_torch_neuronx=True, sliding_window=False, nki_package=None,
            jitted=True, logit_bias=True):
    jit = lambda func: Launchable(func, launches)  # noqa: E731
    flash_fwd = _flash_fwd_221(sliding_window, logit_bias)
    ops = {"nki_jit": lambda: jit} if nki_jit_in_torch_neuronx else {}  # deprecated in 2.21, gone from 2.24
    leaves = {
        "neuronxcc.nki.kernels.attention": _module("attention", flash_fwd=jit(flash_fwd) if jitted else flash_fwd,
                                                   FlashConfig=FlashConfig221),
        "neuronxcc.nki": _module("neuronxcc.nki", jit=jit),
        "torch_neuronx.xla_impl.ops": _module("ops", **ops),
        "torch_neuronx": _module("torch_neuronx", trace=_trace_standin(traces)),
    }
    if nki_package == "0.2.0":  # 2.27 ships NKI 0.2.0 beside neuronxcc.nki (nki.tensor, no nki.meta yet)
        leaves["nki"] = _module("nki", jit=jit, tensor=object)
    return _packages(leaves, {"neuronxcc": "2.21.18209.0", "torch_neuronx": "2.9.0.2.11.0", "nki": nki_package or ""})


def sdk_228(launches, traces, *, keeps_neuronxcc_kernel: bool):
    """2.28+: NKI 0.2+ as the `nki` package with nki.meta; neuronxcc.nki.* deprecated (removal announced
    for 2.28, postponed; a compile error inside kernels from 2.30)."""
    modules = sdk_221(launches, traces, nki_jit_in_torch_neuronx=False, sliding_window=True)
    nki = _packages({"nki.meta": _module("nki.meta", tensor=object)}, {"nki": "0.2.0"})
    modules.update(nki)
    if not keeps_neuronxcc_kernel:
        modules["neuronxcc.nki.kernels.attention"] = None  # import fails
    return modules


GENERATIONS = {  # stand-in -> (generation, kernel version, caller allocates o)
    "2.20": (lambda l, t: sdk_220(l, t), "2.20", "2.20", True),
    "2.21-2.23": (lambda l, t: sdk_221(l, t), "2.21-2.23", "2.21", False),
    "2.21 without logit_bias": (lambda l, t: sdk_221(l, t, logit_bias=False), "2.21-2.23", "2.21", False),
    "2.21-2.23 unjitted": (lambda l, t: sdk_221(l, t, jitted=False), "2.21-2.23", "2.21", False),
    "2.24": (lambda l, t: sdk_221(l, t, nki_jit_in_torch_neuronx=False), "2.24-2.27", "2.21", False),
    "2.25-2.26 sliding_window": (lambda l, t: sdk_221(l, t, nki_jit_in_torch_neuronx=False, sliding_window=True),
                                 "2.24-2.27", "2.21-swa", False),
    "2.27 with nki 0.2.0": (lambda l, t: sdk_221(l, t, nki_jit_in_torch_neuronx=False, sliding_window=True,
                                                 nki_package="0.2.0"), "2.24-2.27", "2.21-swa", False),
}


def install(monkeypatch, modules):
    for name in [n for n in sys.modules if n.split(".")[0] in ("neuronxcc", "torch_neuronx", "nki")]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def qkv(b, h, kv, d, n, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, d, n, generator=g).to(dtype), torch.randn(b, kv, d, n, generator=g).to(dtype),
            torch.randn(b, kv, n, d, generator=g).to(dtype))


@pytest.mark.parametrize("sdk", list(GENERATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract_launch(sdk, dtype, monkeypatch):
    make, generation, kernel_version, allocates = GENERATIONS[sdk]
    launches = []
    install(monkeypatch, make(launches, []))
    api = binding.detect_kernel_api()
    assert (api.generation, api.kernel_version, api.caller_allocates_output) == (generation, kernel_version, allocates)
    q, k, v = qkv(2, 8, 2, 64, 1024, dtype)
    attrs = FlashFwdAttrs(softmax_scale=0.125, use_causal_mask=True, num_heads=8, num_kv_heads=2, mixed_precision=True)
    o = binding.launch_flash_fwd(api, q, k, v, attrs, seq_tile_size=512)

    (launch,) = launches
    assert launch["grid"] == (2, 2)  # [b, kv heads], never [b, q heads]
    args = launch["args"]
    assert args["q"] is q and args["k"] is k and args["v"] is v  # kernel layouts, passed as they are
    assert args["seed"] is None
    if allocates:
        assert launch["positional"] == 5 and args["o"] is o  # q, k, v, seed, o positionally; o caller-allocated
    else:
        assert launch["positional"] == 4 and "o" not in args and "lse" not in args
        assert "logit_bias" not in args and "sliding_window" not in args  # left at their defaults (off)
    assert args["softmax_scale"] == 0.125 and args["use_causal_mask"] is True and args["mixed_precision"] is True
    assert args["dropout_p"] == 0.0
    config = args["config"]
    assert dataclasses.asdict(config) == dataclasses.asdict(type(config)(seq_tile_size=512, training=False))
    assert o.dtype == dtype and tuple(o.shape) == (2, 8, 1024, 64)
    expected = simulate_flash_fwd(q, k, v, softmax_scale=0.125, seq_tile_size=512, kernel_version=kernel_version)
    assert torch.equal(o, expected)


def test_contract_calling_220_style_on_221_fails_as_reported(monkeypatch):
    """Why the generation is detected: the 2.20 call on the 2.21 kernel is nki-samples issue #52
    (TypeError); on the kernel with logit_bias it is worse, o silently binds to logit_bias."""
    q, k, v = qkv(1, 2, 2, 16, 512)
    install(monkeypatch, sdk_221([], [], logit_bias=False))
    wrong = dataclasses.replace(binding.detect_kernel_api(), caller_allocates_output=True)
    with pytest.raises(TypeError, match="multiple values for argument 'softmax_scale'"):
        binding.launch_flash_fwd(wrong, q, k, v, FlashFwdAttrs(0.25, True, 2, 2), seq_tile_size=512)
    launches = []
    install(monkeypatch, sdk_221(launches, []))
    wrong = dataclasses.replace(binding.detect_kernel_api(), caller_allocates_output=True)
    with pytest.raises(AssertionError):
        binding.launch_flash_fwd(wrong, q, k, v, FlashFwdAttrs(0.25, True, 2, 2), seq_tile_size=512)
    assert tuple(launches[0]["args"]["logit_bias"].shape) == (1, 2, 512, 16)  # o, where a bias goes


def test_positional_arguments_after_seed_would_hit_sliding_window(monkeypatch):
    """Why everything after seed goes by keyword: the later kernel inserted sliding_window before
    mixed_precision, so a positional call would bind mixed_precision's value to sliding_window."""
    params = list(inspect.signature(_flash_fwd_221(sliding_window=True)).parameters)
    assert params.index("sliding_window") == params.index("mixed_precision") - 1
    assert params[:5] == ["q", "k", "v", "seed", "logit_bias"]


# --- generations that cannot run flash_fwd: one line saying what was found ------------------------------


def refusal(monkeypatch, modules) -> str:
    install(monkeypatch, modules)
    with pytest.raises(binding.SDKUnusable) as info:
        binding.detect_kernel_api()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_no_sdk_at_all(monkeypatch):
    message = refusal(monkeypatch, {"neuronxcc": None, "nki": None})
    assert message.startswith("the Neuron SDK is not installed")
    assert "pip install torch-neuronx neuronx-cc --extra-index-url=https://pip.repos.neuron.amazonaws.com" in message


def test_neuronxcc_without_the_kernel_module_says_exactly_that(monkeypatch):
    modules = sdk_221([], [], nki_jit_in_torch_neuronx=False)
    modules["neuronxcc.nki.kernels.attention"] = None
    message = refusal(monkeypatch, modules)
    assert message.startswith("neuronxcc 2.21.18209.0 imports but neuronxcc.nki.kernels.attention does not "
                              "(ModuleNotFoundError: ")
    assert "flash_fwd runs on Inf2 with Neuron SDK 2.20 to 2.27" in message


@pytest.mark.parametrize("keeps_neuronxcc_kernel", [False, True])
def test_sdk_228_and_later_refused_naming_the_releases_that_run_flash_fwd(keeps_neuronxcc_kernel, monkeypatch):
    message = refusal(monkeypatch, sdk_228([], [], keeps_neuronxcc_kernel=keeps_neuronxcc_kernel))
    assert message.startswith("found the nki package 0.2.0 of Neuron SDK 2.28 or later (nki.meta)")
    assert ("beside a deprecated neuronxcc.nki.kernels.attention" in message) == keeps_neuronxcc_kernel
    assert "no flash_fwd for Inf2" in message and "LNC degree" in message
    assert "flash_fwd runs on Inf2 with Neuron SDK 2.20 to 2.27" in message


def test_nki_package_without_neuronxcc(monkeypatch):
    modules = _packages({"nki.language": _module("nki.language")}, {"nki": "0.3.0"})
    modules["neuronxcc"] = None
    message = refusal(monkeypatch, modules)
    assert message.startswith("found the nki package 0.3.0 but no neuronxcc")


def test_220_kernel_without_nki_jit_is_refused(monkeypatch):
    modules = sdk_220([], [])
    del modules["torch_neuronx.xla_impl.ops"].nki_jit
    message = refusal(monkeypatch, modules)
    assert "takes o (the SDK 2.20 kernel) but torch_neuronx.xla_impl.ops.nki_jit" in message


def test_unknown_signature_is_refused(monkeypatch):
    modules = sdk_221([], [])
    modules["neuronxcc.nki.kernels.attention"].flash_fwd = Launchable(lambda q, k, v, *, scale=None: None, [])
    message = refusal(monkeypatch, modules)
    assert "not those of any known flash_fwd" in message


def test_compile_refusal_is_one_line_exit_2_nothing_written(monkeypatch, tmp_path, capsys):
    install(monkeypatch, sdk_228([], [], keeps_neuronxcc_kernel=False))
    model_path, out = tmp_path / "fused.onnx", tmp_path / "model.neuron.pt"
    onnx.save(fused_model(), model_path)
    assert cli_main(["compile", str(model_path), "--shape", "x=1x512x64", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuse-attn: error: found the nki package")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["fused.onnx"]


# --- the whole command with a stand-in SDK -------------------------------------------------------------


@pytest.mark.parametrize("sdk", ["2.20", "2.25-2.26 sliding_window"])
def test_contract_compile_end_to_end_with_stand_in_sdk(sdk, monkeypatch, tmp_path, capsys):
    """compile_main with a stand-in SDK: its torch_neuronx.trace records its arguments and returns a
    CPU torch.jit.trace of the lowered module (not a NEFF)."""
    make, generation, kernel_version, _ = GENERATIONS[sdk]
    launches, traces = [], []
    install(monkeypatch, make(launches, traces))
    model_path, out = tmp_path / "fused.onnx", tmp_path / "model.neuron.pt"
    onnx.save(fused_model(layers=2, heads=4, kv_heads=2), model_path)

    argv = [str(model_path), "--target", "inf2", "--shape", "x=2x300x64", "-o", str(out), "--auto-cast", "matmult",
            "--auto-cast-type", "bf16", "--compiler-arg=--optlevel=2"]
    assert compile_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"flash_fwd {kernel_version} (the installed SDK {generation})" in printed
    assert f"NKI flash_fwd of SDK {generation}" in printed
    (traced,) = traces
    assert traced["compiler_args"] == ["--target", "inf2", "--model-type", "transformer", "--auto-cast", "matmult",
                                       "--auto-cast-type", "bf16", "--optlevel=2"]
    assert [tuple(x.shape) for x in traced["example_inputs"]] == [(2, 300, 64)]
    # Two FlashFwd nodes, each launched once on [b, kv] with seq padded 300 -> 512, tile 512.
    assert [launch["grid"] for launch in launches] == [(2, 2), (2, 2)]
    assert all(tuple(launch["args"]["q"].shape) == (2, 4, 16, 512) for launch in launches)
    assert all(tuple(launch["args"]["v"].shape) == (2, 2, 512, 16) for launch in launches)
    assert all(launch["args"]["config"].seq_tile_size == 512 for launch in launches)

    # The saved module (CPU TorchScript here) computes the model: compare with onnxruntime.
    loaded = torch.jit.load(str(out))
    x = np.random.default_rng(3).standard_normal((2, 300, 64)).astype(np.float32)
    expected = ort.InferenceSession(model_path.read_bytes(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = loaded(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() < 3e-2  # mixed precision: bf16 error


def test_simulate_follows_the_installed_kernel(monkeypatch, tmp_path, capsys):
    install(monkeypatch, sdk_220([], []))
    model_path = tmp_path / "fused.onnx"
    onnx.save(fused_model(), model_path)
    assert compile_main([str(model_path), "--simulate", "--shape", "x=1x512x64"]) == 0
    out = capsys.readouterr().out
    assert "flash_fwd 2.20 (the installed SDK 2.20)" in out and "CPU simulator of flash_fwd 2.20 arithmetic" in out


def test_kernel_version_other_than_the_installed_one_is_refused_without_simulate(monkeypatch, tmp_path, capsys):
    install(monkeypatch, sdk_220([], []))
    model_path = tmp_path / "fused.onnx"
    onnx.save(fused_model(), model_path)
    argv = [str(model_path), "--shape", "x=1x512x64", "-o", str(tmp_path / "m.pt"), "--kernel-version", "2.21"]
    assert compile_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fuse-attn: error: --kernel-version 2.21: the installed SDK's flash_fwd is 2.20 (--kernel-version "
                   "chooses only what --simulate follows)"]
    assert not (tmp_path / "m.pt").exists()
