"""Hugging Face models on the module path: a training step next to the same model with its
activation swapped by hand, measured side by side in one run.

    python benchmarks/hf_step.py [--repeats 30] [--compiled-repeats 30] [--no-compile] [--threads 2]

Writes ``hf_step.md`` and ``hf_step.json``. Models (random weights, built in code):
- a relufied Llama (``LlamaForCausalLM``: hidden 256, gated MLP 688, 4 layers, 4 heads, vocab
  512; batch 4, sequence 128): ``sugarize(model, relufy=("silu",))`` against the same model with
  ``hidden_act="relu"`` (its ``nn.ReLU`` built by transformers, the hand swap), and the SiLU
  original;
- a ReLU BERT (``BertModel``: hidden 256, 4 layers, intermediate 1024, ``hidden_act="relu"``;
  batch 4, sequence 128): ``sugarize(model)`` with the defaults against the plain model.

One SGD step (forward, backward, update). Steps are interleaved with the order rotated every
round; a variant's figure is the median over rounds of its ratio to the baseline's step in the
same round, with the quartiles. Compiled: ``torch.compile(model)`` (Inductor), compile time
apart. The first eager step (which may compile the op's fused kernels) is reported apart too.
Each case has an A/A control: the baseline built a second time and timed like the others, so
a ratio's distance from it, not from 1.000, is what the variant costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile-worker pool competing with timed steps

import torch  # noqa: E402

from _common import finish, interleaved, machine, machine_line, md_table  # noqa: E402

import sugarize  # noqa: E402

BATCH, SEQ = 4, 128


def llama(act: str):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                                   hidden_act=act, use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def bert():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=1024, hidden_act="relu", max_position_embeddings=SEQ)
    return transformers.BertModel(cfg)


def _llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _bert_loss(model, ids):
    return model(input_ids=ids).last_hidden_state.square().mean()


CASES = {
    "Llama, relufied (SiLU -> ReLU)": {
        "loss": _llama_loss, "baseline": "hand-swapped nn.ReLU",
        "variants": {
            "hand-swapped nn.ReLU": lambda: llama("relu"),
            "sugarize relufy=('silu',)": lambda: sugarize.sugarize(llama("silu"), relufy=("silu",)),
            "SiLU original (for reference)": lambda: llama("silu"),
            "hand-swapped nn.ReLU, built again (A/A control)": lambda: llama("relu"),
        },
    },
    "BERT, ReLU (default options)": {
        "loss": _bert_loss, "baseline": "plain ReLU BERT",
        "variants": {
            "plain ReLU BERT": bert,
            "sugarize defaults": lambda: sugarize.sugarize(bert()),
            "plain ReLU BERT, built again (A/A control)": bert,
        },
    },
}


def make_step(model, loss_fn, ids):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, ids).backward()
        opt.step()
    return step


def measure(case: dict, repeats: int, compiled: bool) -> dict[str, dict]:
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    names = list(case["variants"])
    steps, out = {}, {}
    for name in names:
        model = case["variants"][name]().train()
        if compiled:
            torch._dynamo.reset()
            model = torch.compile(model)
        step = make_step(model, case["loss"], ids)
        t = time.perf_counter()
        step()
        out[name] = {"first_step_s": time.perf_counter() - t}
        step()
        steps[name] = step
    stats, _ = interleaved(steps, repeats, case["baseline"])
    for n in names:
        out[n].update(stats[n])
        if compiled:
            out[n]["compile_s"] = out[n]["first_step_s"] - out[n]["step_ms"] / 1e3
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compiled-repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    m = machine()
    data = {"machine": m, "batch": BATCH, "sequence": SEQ, "cases": {}}
    md = ["# Hugging Face models on the module path, next to the hand-swapped model", "",
          f"`python benchmarks/hf_step.py` on {machine_line(m)}.", "",
          f"One SGD training step, batch {BATCH}, sequence {SEQ}. Steps interleaved, the order rotated every "
          "round; *ratio*: the median over rounds of the ratio to the baseline's step in the same round "
          f"({args.repeats} rounds eager, {args.compiled_repeats} compiled); *q1-q3*: their quartiles.", ""]
    for case_name, case in CASES.items():
        print(f"[{time.perf_counter() - start:.0f} s] {case_name}: eager", flush=True)
        eager = measure(case, args.repeats, compiled=False)
        comp = {}
        if not args.no_compile:
            print(f"[{time.perf_counter() - start:.0f} s] {case_name}: compiled", flush=True)
            comp = measure(case, args.compiled_repeats, compiled=True)
        data["cases"][case_name] = {"eager": eager, "compiled": comp, "baseline": case["baseline"]}
        rows = []
        for n in case["variants"]:
            e, c = eager[n], comp.get(n)
            rows.append([n, f"{e['step_ms']:.1f}", f"{e['ratio']:.3f}", f"{e['ratio_q1']:.3f}-{e['ratio_q3']:.3f}",
                         f"{e['first_step_s']:.2f}"]
                        + ([f"{c['step_ms']:.1f}", f"{c['ratio']:.3f}", f"{c['ratio_q1']:.3f}-{c['ratio_q3']:.3f}",
                            f"{c['compile_s']:.0f}"] if c else ["-"] * 4))
        md += [f"## {case_name} (baseline: {case['baseline']})", "",
               md_table(["variant", "eager step ms", "eager ratio", "q1-q3", "first eager step s",
                         "compiled step ms", "compiled ratio", "q1-q3", "compile s"], rows), ""]
    return finish("hf_step", md, data, start, args.out)


if __name__ == "__main__":
    sys.exit(main())
