"""SUGAR's training and inference cost next to ReLU's, measured side by side in one run.

    python benchmarks/perf.py [--repeats 5] [--compiled-repeats 8] [--no-compile] [--out benchmarks/results]
    python benchmarks/perf.py --compiled-only [--compiled-repeats 40]
    python benchmarks/perf.py --scale-only [--repeats 5] [--compiled-repeats 8]
    python benchmarks/perf.py --conversion-only
    python benchmarks/perf.py --finetune-only [--repeats 5]
    python benchmarks/perf.py --default-only [--repeats 5] [--compiled-repeats 8]

Writes ``perf.md`` and ``perf.json`` (``--compiled-only``: the compiled rows alone, with
more rounds, to ``perf_compiled.md`` and ``.json``). Every figure is a ratio to plain ReLU in the same run:
- training step time (SGD, median of interleaved steps) for a ResNet-18-style CNN (32x32,
  batch 64), a ResNet-50-style bottleneck CNN (64x64, batch 32) and a deep MLP, eager and
  under ``torch.compile`` (compile time separately); SUGAR fused (the default),
  unfused, and fused with the opt-in kernels (fused: BatchNorm-fed sites with their BatchNorm,
  Linear-read sites with their Linear);
- memory held for the backward pass: bytes of the unique non-parameter tensors autograd
  saves (``saved_tensors_hooks``), and the peak RSS of a fresh process running 3 steps;
- transformer scale (#31): an MLP 8x2048 (batch 512) and a relufied Llama (hidden 512, gated MLP
  1376, 2 layers, sequence 256, batch 4, eager attention): saved bytes and step, eager and
  compiled, Linear-fused (the default) and unfused (``--scale-only`` writes ``perf_scale.md``);
- fine-tuning setups (#37): the relufied Llama under LoRA on all 7 Linear kinds (applied after and
  before conversion, dropout 0 and 0.05), bf16 autocast and gradient checkpointing: saved bytes and
  step, the default and the unfused op, against the ReLU twin under the same setup
  (``--finetune-only`` writes ``perf_finetune.md``);
- conversion cost: ``sugarize`` + ``strip`` beyond one ``symbolic_trace``, 50..5,000 sites;
- onnxruntime latency of the stripped model vs the original, GELU/SiLU models, and a
  forward-gradient-injection model exported without stripping.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile-worker pool competing with timed steps
# Compile afresh: cached artifacts from an older sugarize would be reused (their key is the
# Dynamo graph, which names the op but not its lowering), and compile times would read ~0.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from _common import finish, interleaved, machine, machine_line, md_table  # noqa: E402
from models import ACTIVATIONS, ResNet18, ResNet50  # noqa: E402

import sugarize  # noqa: E402
import sugarize.method.kernels  # noqa: E402
from sugarize.app.demo import DeepMLP  # noqa: E402

DEFAULT = "sugarize default (dead-unit B-SiLU: exact, fused)"
PAPER = "sugarize B-SiLU, the paper's form (exact, fused)"
SUGAR_VARIANTS = {  # sugarize() options; "kernels": the opt-in fused kernels on (sugarize.warmup)
    DEFAULT: {},
    PAPER: {"surrogate": "bsilu"},
    "sugarize B-SiLU, exact, unfused (fuse_bn=False, fuse_linear=False)": {"surrogate": "bsilu", "fuse_bn": False,
                                                                           "fuse_linear": False},
    "sugarize B-SiLU, fused + opt-in kernels (warmup)": {"surrogate": "bsilu", "kernels": True},
    "sugarize NeLU (default, exact)": {"surrogate": "nelu"},
    "sugarize B-SiLU, opt-in save=bfloat16": {"surrogate": "bsilu", "save": "bfloat16"},
    "sugarize B-SiLU, opt-in save=uint8": {"surrogate": "bsilu", "save": "uint8"},
    "sugarize B-SiLU, module path (default)": {"surrogate": "bsilu", "capture": "modules"},
}
VARIANTS = list(ACTIVATIONS) + list(SUGAR_VARIANTS)
COMPILED = ["ReLU", "GELU", "SUGAR by FGI (B-SiLU)", DEFAULT, PAPER,
            "sugarize NeLU (default, exact)", "sugarize B-SiLU, opt-in save=uint8"]
MODELS = {
    "ResNet-18 (32x32, batch 64)": (lambda act: ResNet18(act), (64, 3, 32, 32)),
    "ResNet-50 bottlenecks (64x64, batch 32)": (lambda act: ResNet50(act), (32, 3, 64, 64)),
    "MLP 8x1024 (batch 256)": (lambda act: DeepMLP(8, 1024, inputs=784, act=act), (256, 784)),
}
COMPILED_BY_MODEL = {  # ResNet-50's compile takes a minute per variant here: ReLU and the default only
    "ResNet-18 (32x32, batch 64)": COMPILED,
    "ResNet-50 bottlenecks (64x64, batch 32)": ["ReLU", DEFAULT],
    "MLP 8x1024 (batch 256)": COMPILED + ["sugarize B-SiLU, module path (default)"],
}


def build(model_name: str, variant: str, seed: int = 0) -> nn.Module:
    make, _ = MODELS[model_name]
    torch.manual_seed(seed)
    if variant in SUGAR_VARIANTS:
        options = dict(SUGAR_VARIANTS[variant])
        kernels = options.pop("kernels", False)
        model = sugarize.sugarize(make(nn.ReLU), **options)
        if kernels:
            sugarize.warmup(model)  # compiles them now, and turns them on for the process ...
            sugarize.method.kernels.set_enabled(False)  # ... which make_step scopes to this model's steps
            model.bench_kernels = True
        return model
    return make(ACTIVATIONS[variant])


def batch(model_name: str):
    _, shape = MODELS[model_name]
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)


def make_step(model: nn.Module, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    if not getattr(model, "bench_kernels", False):
        return step
    from sugarize.method import kernels

    def with_kernels():
        kernels.set_enabled(True)
        try:
            step()
        finally:
            kernels.set_enabled(False)
    return with_kernels


def saved_bytes(model: nn.Module, x) -> int:
    """Bytes of the unique non-parameter tensors autograd keeps for the backward pass of ``model(x)``."""
    return scale_saved_bytes(model, lambda m: m(x))


def count_inductor_bytes() -> None:
    """Has Inductor estimate the bytes its generated kernels read and write (``metrics``)."""
    import logging

    from torch._inductor.compile_fx import inductor_metrics_log

    inductor_metrics_log.setLevel(logging.INFO)  # count_bytes() runs only when this log is on
    inductor_metrics_log.propagate = False  # ... and its report goes nowhere
    if not inductor_metrics_log.handlers:
        inductor_metrics_log.addHandler(logging.NullHandler())


def timed_steps(model_name: str, variants: list[str], repeats: int, compiled: bool) -> dict[str, dict]:
    """Step times; compiled, also Inductor's kernel count and kernel bytes for one training step
    (forward and backward graphs; extern kernels such as convolutions and matmuls not counted)."""
    from torch._inductor import metrics

    x, y = batch(model_name)
    steps, out = {}, {}
    if compiled:
        count_inductor_bytes()
    for v in variants:
        model = build(model_name, v)
        if compiled:
            torch._dynamo.reset()
            metrics.reset()
            model = torch.compile(model)
        step = make_step(model, x, y)
        t = time.perf_counter()
        step()  # compiles when compiled
        out[v] = {"first_step_s": time.perf_counter() - t}
        if compiled:
            out[v].update(kernels=metrics.generated_kernel_count, kernel_bytes=metrics.num_bytes_accessed,
                          saved_bytes=saved_bytes(model, x))
        step()
        steps[v] = step
    stats, _ = interleaved(steps, repeats, "ReLU")
    for v in variants:
        out[v].update(stats[v])
        if compiled:
            out[v]["compile_s"] = out[v]["first_step_s"] - out[v]["step_ms"] / 1e3
    return out


def peak_rss_child(model_name: str, variant: str) -> dict:
    """Runs in a fresh process: RSS growth over one step after a warm-up step.

    The peak is VmHWM of the child's own address space (``ru_maxrss`` would carry the
    parent's high-water mark over fork and exec)."""
    code = (
        "import sys, json; sys.path.insert(0, %r)\n"
        "import perf\n"
        "m = perf.build(%r, %r); x, y = perf.batch(%r); step = perf.make_step(m, x, y)\n"
        "step()\n"  # warm-up: one-time allocations and the fused kernels' compilation
        "open('/proc/self/clear_refs', 'w').write('5')\n"  # resets VmHWM to the current RSS
        "before = int(open('/proc/self/statm').read().split()[1]) * %d\n"
        "step()\n"
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(json.dumps({'before': before, 'peak': int(hwm.split()[1]) * 1024}))\n"
    ) % (str(HERE), model_name, variant, model_name, os.sysconf("SC_PAGE_SIZE"))
    # Large blocks straight from mmap, so freed activations leave RSS and each step's peak shows.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def conversion_cost(sizes=(50, 500, 2000, 5000), repeats: int = 3) -> list[dict]:
    """Median of interleaved runs (garbage collected before each) for each model size.

    - ``trace``: one ``torch.fx.symbolic_trace`` (graph and generated code);
    - ``nocopy``: ``strip(sugarize(m, copy=False), copy=False)``, the passes alone;
    - ``copy``: ``strip(sugarize(m))``, the defaults, which deep-copy the model twice;
    - ``codegen``: regenerating the code of a traced graph (``recompile``), which ``strip``
      cannot avoid: the stripped model runs new code.
    """
    import gc

    rows = []
    for n in sizes:
        layers = []
        for _ in range(n):
            layers += [nn.Linear(4, 4), nn.ReLU()]
        model = nn.Sequential(*layers)
        traced = torch.fx.symbolic_trace(model)
        runs = {
            "trace": lambda: torch.fx.symbolic_trace(model),
            "nocopy": lambda: sugarize.strip(sugarize.sugarize(model, copy=False), copy=False),
            "copy": lambda: sugarize.strip(sugarize.sugarize(model)),
            "codegen": traced.recompile,
        }
        times = {k: [] for k in runs}
        for _ in range(repeats):
            for k, f in runs.items():
                gc.collect()
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        tr = med["trace"]
        rows.append({"sites": n, "trace_s": tr, "nocopy_s": med["nocopy"], "copy_s": med["copy"],
                     "codegen_s": med["codegen"],
                     "nocopy_beyond_ratio": (med["nocopy"] - tr) / tr, "copy_beyond_ratio": (med["copy"] - tr) / tr,
                     "codegen_ratio": med["codegen"] / tr, "nocopy_per_site_ms": 1e3 * med["nocopy"] / n})
    return rows


def ort_latency(path, x, repeats: int = 30) -> float:
    from sugarize.deploy.runtimes import ort_session

    sess = ort_session(path, threads=torch.get_num_threads())
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(3):
        sess.run(None, feed)
    return sess, feed


def inference(repeats: int) -> dict:
    from sugarize.deploy.export import export_onnx

    model_name = "ResNet-18 (32x32, batch 64)"
    x = torch.randn(8, 3, 32, 32)
    tmp = Path(tempfile.mkdtemp(prefix="sugarize-bench-"))
    rows = {}
    relu = build(model_name, "ReLU").eval()
    sm = sugarize.sugarize(relu)
    fgi = build(model_name, "SUGAR by FGI (B-SiLU)").eval()
    fgi.load_state_dict(relu.state_dict())
    cases = {
        "original ReLU model": (relu, True),
        "sugarize -> strip (B-SiLU)": (sm, True),
        "GELU model": (build(model_name, "GELU").eval(), True),
        "SiLU model": (build(model_name, "SiLU").eval(), True),
        "FGI model exported as is": (fgi, False),
    }
    sessions = {}
    for name, (model, strip) in cases.items():
        path = tmp / (name.replace(" ", "_").replace(">", "").replace("(", "").replace(")", "") + ".onnx")
        if strip:
            res = export_onnx(model, path, (x,))
            ops = res.op_types
        else:  # what a user gets exporting the paper's formulation: no strip pass
            with torch.no_grad():
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    torch.onnx.export(model, (x,), str(path), dynamo=True)
            import onnx

            ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        sessions[name] = ort_latency(path, x)
        rows[name] = {"nodes": len(ops), "ops": sorted(set(ops)), "times": []}
    for _ in range(repeats):
        for name, (sess, feed) in sessions.items():
            t = time.perf_counter()
            sess.run(None, feed)
            rows[name]["times"].append(time.perf_counter() - t)
    for r in rows.values():
        r["ms"] = 1e3 * statistics.median(r.pop("times"))
    return rows


SCALE_VARIANTS = {  # what each scale model is built as: (activation of the plain model, sugarize options or None)
    "ReLU": ("relu", None),
    "SiLU (the original a relufied model replaces)": ("silu", None),
    "sugarize B-SiLU (default: exact, Linear-fused)": ("relu", {}),
    "sugarize, exact, fuse_linear=False (unfused)": ("relu", {"fuse_linear": False}),
    "sugarize, opt-in save=uint8": ("relu", {"save": "uint8"}),
}
SCALE_LLAMA = {k.replace("sugarize", "relufy silu, sugarize", 1) if k.startswith("sugarize") else k: v
               for k, v in SCALE_VARIANTS.items()}
SCALE_COMPILED = {"MLP 8x2048 (batch 512)": ["ReLU", "sugarize B-SiLU (default: exact, Linear-fused)",
                                             "sugarize, exact, fuse_linear=False (unfused)"],
                  "relufied Llama (hidden 512, MLP 1376, 2 layers, seq 256, batch 4)": [
                      "ReLU", "SiLU (the original a relufied model replaces)",
                      "relufy silu, sugarize B-SiLU (default: exact, Linear-fused)"]}


def scale_model(model_name: str, variant: str):
    """``(model, batch, step loss)`` for the transformer-scale rows (#31)."""
    torch.manual_seed(0)
    if model_name.startswith("MLP"):
        act, options = SCALE_VARIANTS[variant]
        layers = []
        for i in range(8):
            layers += [nn.Linear(784 if i == 0 else 2048, 2048), nn.ReLU() if act == "relu" else nn.SiLU()]
        model = nn.Sequential(*layers, nn.Linear(2048, 10))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(512, 784, generator=g), torch.randint(0, 10, (512,), generator=g)
        loss = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    else:
        import transformers

        act, options = SCALE_LLAMA[variant]
        base = "silu" if options is not None else act  # sugarize relufies the SiLU original
        cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                                       hidden_act=base, use_cache=False, attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
        ids = torch.randint(0, 1024, (4, 256), generator=torch.Generator().manual_seed(0))
        x = ids
        loss = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
        if options is not None:
            options = {"relufy": ("silu",), **options}
    if options is not None:
        model = sugarize.sugarize(model, **options)
    return model, x, loss


def scale_saved_bytes(model, loss) -> int:
    """Bytes of the unique non-parameter tensors autograd keeps for the backward pass of ``loss(model)``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss(model)
    del out
    return sum(seen.values())


def scale_rows(repeats: int, compiled_repeats: int, compile_: bool) -> dict:
    """Saved bytes and step time of each scale variant, eager and compiled, as ratios to ReLU's."""
    out: dict = {}
    for model_name, variants in (("MLP 8x2048 (batch 512)", list(SCALE_VARIANTS)),
                                 ("relufied Llama (hidden 512, MLP 1376, 2 layers, seq 256, batch 4)",
                                  list(SCALE_LLAMA))):
        rows: dict = {v: {} for v in variants}
        for mode in (["eager", "compiled"] if compile_ else ["eager"]):
            names = variants if mode == "eager" else SCALE_COMPILED[model_name]
            steps = {}
            for v in names:
                model, _, loss = scale_model(model_name, v)
                if mode == "compiled":
                    torch._dynamo.reset()
                    model = torch.compile(model)
                opt = torch.optim.SGD(model.parameters(), lr=1e-4)

                def step(model=model, loss=loss, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    loss(model).backward()
                    opt.step()

                t = time.perf_counter()
                step()
                rows[v][f"{mode}_first_s"] = time.perf_counter() - t
                rows[v][f"{mode}_saved_bytes"] = scale_saved_bytes(model, loss)
                steps[v] = step
            stats, _ = interleaved(steps, repeats if mode == "eager" else compiled_repeats, "ReLU")
            for v in names:
                rows[v].update({f"{mode}_{k}": val for k, val in stats[v].items()})
            del steps
        out[model_name] = rows
    return out


FT_SETUPS = ["LoRA on all 7 Linear kinds, after conversion", "LoRA on all 7 Linear kinds, before conversion",
             "LoRA with dropout 0.05, after conversion", "bf16 autocast (float32 weights)",
             "gradient checkpointing (non-reentrant)"]
FT_VARIANTS = ["ReLU", "sugarize default", "sugarize, fuse_linear=False (the unfused op)"]
FT_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def finetune_setup(setup: str, variant: str):
    """``(model, step loss, context)`` for one row of the fine-tuning setups (#37): a relufied Llama
    (hidden 256, gated MLP 688, 2 layers, seq 128, batch 4, eager attention), the ReLU twin built with
    ``hidden_act="relu"`` and the same setup."""
    import contextlib

    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   hidden_act="relu" if variant == "ReLU" else "silu", use_cache=False,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg)
    options = {} if variant == "sugarize default" else {"fuse_linear": False}
    lora = "LoRA" in setup
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=FT_LINEARS,
                             lora_dropout=0.05 if "dropout" in setup else 0.0)
    if variant != "ReLU" and lora and "before" in setup:
        model = sugarize.sugarize(peft.get_peft_model(model, config), relufy=("silu",), **options)
    else:
        if variant != "ReLU":
            model = sugarize.sugarize(model, relufy=("silu",), **options)
        if lora:
            model = peft.get_peft_model(model, config)
    if "checkpointing" in setup:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    context = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "autocast" in setup
               else contextlib.nullcontext)

    def loss(m):
        with context():
            return m(input_ids=ids, labels=ids).loss

    return model, loss


def finetune_rows(repeats: int) -> dict:
    """Saved bytes and step time of each variant under each fine-tuning setup, as ratios to ReLU's."""
    out: dict = {}
    for setup in FT_SETUPS:
        rows: dict = {v: {} for v in FT_VARIANTS}
        steps = {}
        for v in FT_VARIANTS:
            model, loss = finetune_setup(setup, v)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step(model=model, loss=loss, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss(model).backward()
                opt.step()

            step()  # warm
            rows[v]["saved_bytes"] = scale_saved_bytes(model, loss)
            steps[v] = step
        stats, _ = interleaved(steps, repeats, "ReLU")
        for v in FT_VARIANTS:
            rows[v].update(stats[v])
        out[setup] = rows
        print(f"  {setup}: " + ", ".join(f"{v}: {rows[v]['saved_bytes'] / rows['ReLU']['saved_bytes']:.3f}x saved, "
                                        f"{rows[v]['ratio']:.3f}x step" for v in FT_VARIANTS), flush=True)
    return out


def default_rows(repeats: int, compiled_repeats: int, compile_: bool) -> dict:
    """The default surrogate next to ReLU and the paper's B-SiLU (#40): eager step and saved bytes on the
    three models (BatchNorm-fused ResNets, Linear-fused MLP), compiled on ResNet-18 and the MLP."""
    out: dict = {}
    names = ["ReLU", DEFAULT, PAPER]
    for model_name in MODELS:
        x, _ = batch(model_name)
        rows = {v: {"saved_bytes": saved_bytes(build(model_name, v), x)} for v in names}
        for v, r in timed_steps(model_name, names, repeats, compiled=False).items():
            rows[v].update(r)
        if compile_ and not model_name.startswith("ResNet-50"):
            for v, r in timed_steps(model_name, names, compiled_repeats, compiled=True).items():
                rows[v].update({f"compiled_{k}": val for k, val in r.items()})
        out[model_name] = rows
        print(f"  {model_name}: " + ", ".join(
            f"{v}: {rows[v]['saved_bytes'] / rows['ReLU']['saved_bytes']:.3f}x saved, {rows[v]['ratio']:.3f}x step"
            for v in names), flush=True)
    return out


def default_markdown(rows: dict) -> list[str]:
    md = ["## The default surrogate (dead-unit B-SiLU) next to ReLU and the paper's B-SiLU (#40)", "",
          "*saved ratio*: unique non-parameter bytes autograd keeps for the backward, to ReLU's; *step ratio*: "
          "median of interleaved rounds (q1-q3), SGD; compiled: `torch.compile` (Inductor), its saved ratio the "
          "compiled forward's. Targets: saved <= 1.02x, step <= 1.05x.", ""]
    for model_name, r in rows.items():
        def comp(v, key):
            return f"{r[v][key]:.3f}" if key in r[v] else "-"

        md += [f"### {model_name}", "",
               md_table(["variant", "saved MiB", "saved ratio", "step ms", "step ratio (q1-q3)",
                         "compiled step ratio (q1-q3)", "compiled saved ratio"],
                        [[v, f"{r[v]['saved_bytes'] / 2**20:.1f}", f"{r[v]['saved_bytes'] / r['ReLU']['saved_bytes']:.3f}",
                          f"{r[v]['step_ms']:.0f}", f"{r[v]['ratio']:.3f} ({r[v]['ratio_q1']:.3f}-{r[v]['ratio_q3']:.3f})",
                          (f"{r[v]['compiled_ratio']:.3f} ({r[v]['compiled_ratio_q1']:.3f}-{r[v]['compiled_ratio_q3']:.3f})"
                           if "compiled_ratio" in r[v] else "-"),
                          (f"{r[v]['compiled_saved_bytes'] / r['ReLU']['compiled_saved_bytes']:.3f}"
                           if "compiled_saved_bytes" in r[v] else "-")]
                         for v in r]), ""]
    return md


def _alone(args, name: str, key: str, title: str, flags: str, rows, markdown) -> int:
    """One section measured alone into ``results/NAME.md`` and ``.json``: its title, the command
    that made it (``flags``), then ``markdown(rows())``; the JSON holds the rows under ``key``."""
    start = time.perf_counter()
    m = machine()
    data = rows()
    md = [f"# {title}", "", f"`python benchmarks/perf.py {flags}` on {machine_line(m)}.", ""]
    return finish(name, md + markdown(data), {"machine": m, key: data}, start, args.out)


def default_only(args) -> int:
    return _alone(args, "perf_default", "default", "The default surrogate's cost next to ReLU",
                  f"--default-only --repeats {args.repeats} --compiled-repeats {args.compiled_repeats}",
                  lambda: default_rows(args.repeats, args.compiled_repeats, not args.no_compile), default_markdown)


def finetune_markdown(rows: dict) -> list[str]:
    md = ["## Fine-tuning setups: LoRA, autocast, checkpointing (#37)", "",
          "A relufied Llama (hidden 256, gated MLP 688, 2 layers, seq 128, batch 4, eager attention), AdamW on "
          "the trainable parameters. *saved ratio*: unique non-parameter bytes autograd keeps for the backward, "
          "to the ReLU twin's (`hidden_act=\"relu\"`, the same setup) in the same run; *step ratio*: median of "
          "interleaved rounds (q1-q3). Targets: saved <= 1.02x, step <= 1.05x.", "",
          md_table(["setup", "variant", "saved MiB", "saved ratio", "step ms", "step ratio (q1-q3)"],
                   [[setup, v, f"{r['saved_bytes'] / 2**20:.1f}",
                     f"{r['saved_bytes'] / rows[setup]['ReLU']['saved_bytes']:.3f}", f"{r['step_ms']:.0f}",
                     f"{r['ratio']:.3f} ({r['ratio_q1']:.3f}-{r['ratio_q3']:.3f})"]
                    for setup in rows for v, r in rows[setup].items()]), ""]
    return md


def finetune_only(args) -> int:
    return _alone(args, "perf_finetune", "finetune", "SUGAR under the fine-tuning setups people use, next to ReLU",
                  f"--finetune-only --repeats {args.repeats}", lambda: finetune_rows(args.repeats), finetune_markdown)


def scale_markdown(scale: dict) -> list[str]:
    md = ["## Transformer scale: Linear-fed sites (#31)", "",
          "*saved ratio*: bytes of the unique non-parameter tensors autograd keeps for the backward "
          "(`saved_tensors_hooks`), to the ReLU model's in the same run, eager and under `torch.compile`; "
          "*step ratio*: the median over interleaved rounds of the step's ratio to ReLU's (q1-q3 its quartiles). "
          "The relufied Llama's plain rows are the same model with `hidden_act` relu and silu.", ""]
    for model_name, rows in scale.items():
        base = rows["ReLU"]

        def ratio(r, key):
            return f"{r[key] / base[key]:.3f}" if key in r else "-"

        md += [f"### {model_name}", "",
               md_table(["variant", "saved MiB (eager)", "saved ratio (eager)", "saved ratio (compiled)",
                         "eager step ms", "eager step ratio (q1-q3)", "compiled step ratio (q1-q3)"],
                        [[v, f"{r['eager_saved_bytes'] / 2**20:.1f}", ratio(r, "eager_saved_bytes"),
                          ratio(r, "compiled_saved_bytes"), f"{r['eager_step_ms']:.0f}",
                          f"{r['eager_ratio']:.3f} ({r['eager_ratio_q1']:.3f}-{r['eager_ratio_q3']:.3f})",
                          (f"{r['compiled_ratio']:.3f} ({r['compiled_ratio_q1']:.3f}-{r['compiled_ratio_q3']:.3f})"
                           if "compiled_ratio" in r else "-")]
                         for v, r in rows.items()]), ""]
    return md


def conversion_markdown(conv: list[dict]) -> list[str]:
    return ["## Conversion cost (`nn.Sequential` of Linear+ReLU pairs)", "",
            "Medians of interleaved runs. *beyond / trace* = (sugarize + strip - one symbolic_trace) / "
           "one symbolic_trace. `copy=False` is what the CLI uses; the library default copies the model "
           "in both passes. *codegen / trace*: regenerating a graph's code, which strip must do once.", "",
           md_table(["sites", "symbolic_trace s", "copy=False s", "beyond / trace (copy=False)",
                     "defaults s", "beyond / trace (defaults)", "codegen / trace",
                     "ms per site (copy=False)"],
                    [[r["sites"], f"{r['trace_s']:.3f}", f"{r['nocopy_s']:.3f}", f"{r['nocopy_beyond_ratio']:.2f}",
                      f"{r['copy_s']:.3f}", f"{r['copy_beyond_ratio']:.2f}", f"{r['codegen_ratio']:.2f}",
                      f"{r['nocopy_per_site_ms']:.3f}"]
                     for r in conv]), ""]


def conversion_only(args) -> int:
    """The conversion-cost rows alone, into ``perf.md`` and ``perf.json`` in place of their section."""
    start = time.perf_counter()
    conv = conversion_cost()
    out = args.out or HERE / "results"
    data = json.loads((out / "perf.json").read_text())
    data["conversion"] = conv
    (out / "perf.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    md = (out / "perf.md").read_text()
    head, _, rest = md.partition("## Conversion cost")
    tail = rest[rest.index("\n## "):]
    section = "\n".join(conversion_markdown(conv)) + (
        f"\nThis section re-measured alone (`python benchmarks/perf.py --conversion-only`, {machine_line(machine())}, "
        f"{time.perf_counter() - start:.0f} s), after the rest of the file.\n")
    (out / "perf.md").write_text(head + section + tail)
    print(section)
    return 0


def scale_only(args) -> int:
    return _alone(args, "perf_scale", "scale", "SUGAR at transformer scale next to ReLU",
                  f"--scale-only --repeats {args.repeats} --compiled-repeats {args.compiled_repeats}",
                  lambda: scale_rows(args.repeats, args.compiled_repeats, not args.no_compile), scale_markdown)


KERNEL_NOTE = ("*compiled kernels*: kernels Inductor generated for one training step (forward and "
               "backward); *kernel bytes ratio*: the bytes those kernels read and write, as Inductor "
               "estimates them (`metrics.num_bytes_accessed`), to ReLU's. Both are exact counts, the same "
               "in every run; convolutions and matmuls are extern kernels, in neither. *compiled saved ratio*: "
               "bytes of the activations the compiled forward keeps for the backward, to compiled ReLU's. "
               "*saved ratio* (eager): the same for the eager model.")


def compiled_steps(model_name: str, repeats: int) -> dict[str, dict]:
    return timed_steps(model_name, COMPILED_BY_MODEL[model_name], repeats, compiled=True)


def compiled_only(args) -> int:
    """The torch.compile rows alone, with enough rounds to read a few percent through the noise."""
    start = time.perf_counter()
    m = machine()
    data = {"machine": m, "compiled": {}}
    md = ["# SUGAR under torch.compile next to ReLU", "",
          f"`python benchmarks/perf.py --compiled-only --compiled-repeats {args.compiled_repeats}` on "
          f"{machine_line(m)}.", "",
          "Steps interleaved, the order rotated every round; *ratio*: the median over rounds of the "
          "ratio to ReLU's step in the same round; *q1-q3*: the quartiles of those per-round ratios.", ""]
    for model_name in MODELS:
        print(f"[{time.perf_counter() - start:.0f} s] {model_name}: compiled steps", flush=True)
        comp = compiled_steps(model_name, args.compiled_repeats)
        data["compiled"][model_name] = comp
        base = comp["ReLU"]["kernel_bytes"]
        md += [f"## {model_name}", "",
               md_table(["variant", "step ms", "ratio", "q1-q3", "compile s", "compiled kernels",
                         "kernel bytes ratio", "compiled saved ratio"],
                        [[v, f"{c['step_ms']:.1f}", f"{c['ratio']:.3f}", f"{c['ratio_q1']:.3f}-{c['ratio_q3']:.3f}",
                          f"{c['compile_s']:.0f}", c["kernels"], f"{c['kernel_bytes'] / base:.3f}",
                          f"{c['saved_bytes'] / comp['ReLU']['saved_bytes']:.3f}"]
                         for v, c in comp.items()]), ""]
    md += [KERNEL_NOTE, ""]
    return finish("perf_compiled", md, data, start, args.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved eager steps per variant")
    ap.add_argument("--compiled-repeats", type=int, default=None,
                    help="interleaved compiled steps per variant (default 8; 40 with --compiled-only)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compiled-only", action="store_true", help="only the torch.compile rows")
    ap.add_argument("--conversion-only", action="store_true",
                    help="only the conversion-cost rows, re-measured into perf.md and perf.json")
    ap.add_argument("--scale-only", action="store_true",
                    help="only the transformer-scale rows (MLP 8x2048, relufied Llama), to perf_scale.md")
    ap.add_argument("--default-only", action="store_true",
                    help="only the default surrogate next to ReLU and the paper's B-SiLU, to perf_default.md")
    ap.add_argument("--finetune-only", action="store_true",
                    help="only the fine-tuning setups (LoRA, autocast, checkpointing), to perf_finetune.md")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.compiled_repeats is None:
        args.compiled_repeats = 40 if args.compiled_only else 8
    if args.compiled_only:
        return compiled_only(args)
    if args.scale_only:
        return scale_only(args)
    if args.conversion_only:
        return conversion_only(args)
    if args.finetune_only:
        return finetune_only(args)
    if args.default_only:
        return default_only(args)
    start = time.perf_counter()
    m = machine()
    data = {"machine": m, "training": {}, "compiled": {}, "memory": {}, "conversion": None, "inference": None}
    md = ["# SUGAR cost next to ReLU", "",
          f"`python benchmarks/perf.py` on {machine_line(m)}.", "",
          "Ratios are to plain ReLU in the same run: steps interleaved (the order rotated every "
          "round), the ratio to ReLU's step taken within each round, then the median over rounds. GPU: none on this "
          "machine, so no GPU rows; run the script where `torch.cuda.is_available()` to add them.", ""]
    for model_name in MODELS:
        print(f"[{time.perf_counter() - start:.0f} s] {model_name}: eager steps", flush=True)
        eager = timed_steps(model_name, VARIANTS, args.repeats, compiled=False)
        x, _ = batch(model_name)
        mem = {v: saved_bytes(build(model_name, v), x) for v in VARIANTS}
        print(f"[{time.perf_counter() - start:.0f} s] {model_name}: peak RSS", flush=True)
        # One fresh process per variant, two at a time: each measures only its own address space.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:
            rss = dict(zip(VARIANTS, pool.map(lambda v: peak_rss_child(model_name, v), VARIANTS)))
        comp = {}
        if not args.no_compile:
            print(f"[{time.perf_counter() - start:.0f} s] {model_name}: compiled steps", flush=True)
            comp = compiled_steps(model_name, args.compiled_repeats)
        data["training"][model_name], data["compiled"][model_name] = eager, comp
        data["memory"][model_name] = {v: {"saved_bytes": mem[v], **rss[v]} for v in VARIANTS}
        base_mem = mem["ReLU"]
        base_rss = rss["ReLU"]["peak"] - rss["ReLU"]["before"]
        rows = []
        for v in VARIANTS:
            c = comp.get(v)
            rows.append([
                v, f"{eager[v]['step_ms']:.1f}", f"{eager[v]['ratio']:.3f}",
                f"{mem[v] / 2**20:.1f}", f"{mem[v] / base_mem:.3f}",
                f"{(rss[v]['peak'] - rss[v]['before']) / base_rss:.3f}",
                f"{c['ratio']:.3f}" if c else "-",
                f"{c['compile_s']:.0f}" if c else "-",
                f"{c['kernels']}" if c else "-",
                f"{c['kernel_bytes'] / comp['ReLU']['kernel_bytes']:.3f}" if c else "-",
                f"{c['saved_bytes'] / comp['ReLU']['saved_bytes']:.3f}" if c else "-",
            ])
        md += [f"## Training: {model_name}", "",
               md_table(["variant", "eager step ms", "eager ratio", "saved MiB", "saved ratio",
                         "peak RSS growth ratio", "compiled ratio", "compile s", "compiled kernels",
                         "kernel bytes ratio", "compiled saved ratio"], rows), "", KERNEL_NOTE, ""]
    print(f"[{time.perf_counter() - start:.0f} s] transformer scale", flush=True)
    data["scale"] = scale_rows(args.repeats, args.compiled_repeats, not args.no_compile)
    md += scale_markdown(data["scale"])
    print(f"[{time.perf_counter() - start:.0f} s] fine-tuning setups", flush=True)
    data["finetune"] = finetune_rows(args.repeats)
    md += finetune_markdown(data["finetune"])
    print(f"[{time.perf_counter() - start:.0f} s] conversion cost", flush=True)
    conv = conversion_cost()
    data["conversion"] = conv
    md += conversion_markdown(conv)
    print(f"[{time.perf_counter() - start:.0f} s] onnxruntime inference", flush=True)
    inf = inference(max(30, 5 * args.repeats))
    data["inference"] = inf
    base = inf["original ReLU model"]["ms"]
    md += ["## Inference: onnxruntime, ResNet-18 style, batch 8, "
           f"{torch.get_num_threads()} threads, ORT_ENABLE_ALL", "",
           md_table(["model", "ONNX nodes", "op types", "median ms", "ratio"],
                    [[k, r["nodes"], " ".join(r["ops"]), f"{r['ms']:.2f}", f"{r['ms'] / base:.3f}"]
                     for k, r in inf.items()]), ""]
    return finish("perf", md, data, start, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
