"""Rendering of a `scripts/bench.py` report: the markdown tables, the targets and the plots.

Pure functions of the report dict that bench.py writes as results.json, so a saved run can be
rendered again:

    python -c "import json, sys; sys.path.insert(0, 'scripts'); from pathlib import Path; \
        import bench_report as r; r.plots(json.load(open('docs/benchmark/results.json')), \
        Path('docs/benchmark'))"
"""

from __future__ import annotations

from pathlib import Path

FORMULA_RTOL = 0.005  # hf_zero pads each flat buffer to a multiple of N: far below 0.5%


MB = 1e6


def _mb(x) -> str:
    return "–" if x is None else f"{x / MB:,.1f}"


def main_table(results: dict[str, dict]) -> str:
    head = (
        "| engine | AdamW kernel | s/step | × DDP | × peer | model states / rank (MB) "
        "| ZeRO formula (MB) | measured / formula | peak RSS / rank (MB) "
        "| minor faults / rank / step (MB) "
        "| sent / rank / step (MB) | ZeRO volume (MB on the wire) | final loss |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for e, r in results.items():
        if "skipped" in r:
            rows.append(f"| {e} | | skipped: {r['skipped']} |" + " |" * 10)
            continue
        if "error" in r:
            rows.append(f"| {e} | | FAILED: {r['error']} |" + " |" * 10)
            continue
        peer = ", ".join(f"{v:.2f} ({k})" for k, v in (r.get("vs_peer") or {}).items()) or "–"
        vs_ddp = f"{r['vs_ddp']:.2f}" if r.get("vs_ddp") else "–"
        sent = r["sent_bytes_per_step"]
        sent_s = "–" if None in sent else _mb(max(sent))
        state = max(r["state_bytes"])
        if "hf_zero_state_bytes" in r:
            state_s = f"{_mb(state)} (memory_stats {_mb(max(r['hf_zero_state_bytes']))})"
        else:
            state_s = _mb(state)
        faults = r.get("fault_bytes_per_step")
        faults_s = "–" if not faults else _mb(max(faults))
        step = f"{r['step_s']:.3f}"
        if len(r.get("step_s_rounds", [])) > 1:
            step += f" ({min(r['step_s_rounds']):.3f}–{max(r['step_s_rounds']):.3f})"
        rows.append(
            f"| {e} | {r.get('optimizer_kernel') or '–'} | {step} | {vs_ddp} | {peer} "
            f"| {state_s} "
            f"| {_mb(r['formula_bytes'])} | {r['state_over_formula']:.3f} "
            f"| {_mb(max(r['peak_rss_bytes']))} | {faults_s} | {sent_s} "
            f"| {_mb(r['volume_wire_bytes'])} "
            f"| {r['final_loss']:.6f} |"
        )
    return head + "\n".join(rows) + "\n"


def sweep_table(rows: list[dict], key: str) -> str:
    out = f"| engine | {key} | Ψ | s/step | model states / rank (MB) | formula (MB) "
    out += "| peak RSS (MB) |\n"
    out += "|---|---|---|---|---|---|---|\n"
    for r in rows:
        if "error" in r:
            out += f"| {r['engine']} | {r.get(key, '')} | | FAILED: {r['error']} | | | |\n"
            continue
        val = r["model"] if key == "model" else r["world_size"]
        out += (
            f"| {r['engine']} | {val} | {r['numel'] / 1e6:.2f}M | {r['step_s']:.3f} "
            f"| {_mb(max(r['state_bytes']))} | {_mb(r['formula_bytes'])} "
            f"| {_mb(max(r['peak_rss_bytes']))} |\n"
        )
    return out


def step_ratio(a: dict, b: dict) -> float | None:
    """Step time of run `a` over run `b`, as the targets judge it: with rounds, the median of
    the per-round ratios (a and b of the same round, so a round where the whole machine ran
    slow cancels out); with one round, the ratio of the step times. None if either is missing."""
    if "step_s" not in a or "step_s" not in b:
        return None
    ra, rb = a.get("step_s_rounds"), b.get("step_s_rounds")
    if ra and rb and len(ra) == len(rb) and len(ra) > 1:
        return median([x / y for x, y in zip(ra, rb)])
    return a["step_s"] / b["step_s"]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


STEP_TARGETS = (
    ("hf_zero2", "deepspeed2", 1.00),
    ("hf_zero2", "ddp", 1.05),
    ("hf_zero2", "ddp_fused", 1.05),
    ("hf_zero2", "single", 1.15),
    ("hf_zero2", "single_fused", 1.15),
    ("hf_zero3", "deepspeed3", 1.00),
    ("hf_zero3", "fsdp2", 1.00),
    # ZeRO at the price of DDP, like for like (the same fused AdamW)
    ("hf_zero1", "ddp_fused", 1.00),
    ("hf_zero2", "ddp_fused", 1.00),
    ("hf_zero3", "ddp_fused", 1.10),
    # the same with the after-step all-gather left to the next forward (overlap_param_gather)
    ("hf_zero1_overlap", "ddp_fused", 1.00),
    ("hf_zero2_overlap", "ddp_fused", 1.00),
)


def _step_targets(results: dict[str, dict], where: str = "", *, all_rows: bool = True) -> list:
    out = []
    for eng, peer, limit in STEP_TARGETS:
        r = step_ratio(results.get(eng, {}), results.get(peer, {}))
        if r is None and not all_rows:
            continue
        what = f"{eng} step time ≤ {limit:.2f}× {peer}{where}"
        out.append(
            (what, "–" if r is None else f"{r:.3f}×", "n/a" if r is None else _yes(r <= limit))
        )
    return out


def targets(
    results: dict[str, dict], consolidation: dict, model_sweep: list[dict] | None = None
) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for the figures the project aims at: the step-time ratios on the
    main model, then on every other model of the size sweep that ran both engines."""
    out = _step_targets(results)
    main_model = next((r["model"] for r in results.values() if "model" in r), None)
    for m in dict.fromkeys(r["model"] for r in model_sweep or [] if "step_s" in r):
        if m != main_model:
            at = {r["engine"]: r for r in model_sweep if r.get("model") == m}
            out += _step_targets(at, f" ({m})", all_rows=False)
    for e in ("hf_zero0", "hf_zero1", "hf_zero2", "hf_zero3"):
        over = results.get(e, {}).get("hf_zero_over_formula")
        if over is not None:
            out.append(
                (
                    f"{e} model-state bytes = formula ±0.5%",
                    f"{over:.4f}×",
                    _yes(abs(over - 1) <= FORMULA_RTOL),
                )
            )
    h3 = results.get("hf_zero3", {})
    for peer in ("fsdp2", "deepspeed3"):
        p = results.get(peer, {})
        if "peak_rss_bytes" in h3 and "peak_rss_bytes" in p:
            a, b = max(h3["peak_rss_bytes"]), max(p["peak_rss_bytes"])
            out.append((f"hf_zero3 peak RSS ≤ {peer}", f"{_mb(a)} vs {_mb(b)} MB", _yes(a <= b)))
    h, d = consolidation.get("hf_zero", {}), consolidation.get("deepspeed", {})
    if "peak_rss_bytes" in h and "peak_rss_bytes" in d:
        r = h["peak_rss_bytes"] / d["peak_rss_bytes"]
        out.append(("consolidate peak RSS ≤ 0.5× zero_to_fp32", f"{r:.2f}×", _yes(r <= 0.5)))
        t = h["process_s"] / d["process_s"]
        out.append(("consolidate wall time ≤ zero_to_fp32", f"{t:.2f}×", _yes(t <= 1.0)))
    return out


ACCUM_TARGETS = (("hf_zero1", "hf_zero2"), ("hf_zero1", "ddp_fused"), ("hf_zero2", "ddp_fused"))


def accum_targets(results: dict[str, dict], micro_steps: int) -> list[tuple[str, str, str]]:
    """With gradient accumulation: stage 1 (one reduce-scatter per step) ≤ stage 2 (one per
    micro-step) ≤ DDP-fused, judged like the main targets (median of per-round ratios)."""
    out = []
    for eng, peer in ACCUM_TARGETS:
        a, b = results.get(eng), results.get(peer)
        if a is None or b is None:
            continue
        r = step_ratio(a, b)
        out.append(
            (
                f"{eng} step time ≤ 1.00× {peer} ({micro_steps} accumulation micro-steps)",
                "–" if r is None else f"{r:.3f}×",
                "n/a" if r is None else _yes(r <= 1.0),
            )
        )
    return out


def accum_table(acc: dict) -> str:
    out = (
        f"Gradient accumulation, {acc['micro_steps']} micro-steps per optimizer step (s/step is "
        "the whole optimizer step; ratio: median of per-round ratios):\n\n"
        "| engine | s/step | × ddp_fused | peak RSS / rank (MB) | minor faults / rank / step (MB) "
        "| sent / rank / step (MB) | final loss |\n|---|---|---|---|---|---|---|\n"
    )
    for e, r in acc["results"].items():
        if "step_s" not in r:
            out += f"| {e} | {r.get('error') or r.get('skipped')} | | | | | |\n"
            continue
        sent = r["sent_bytes_per_step"]
        vs = r.get("vs_reference")
        out += (
            f"| {e} | {r['step_s']:.3f} | {'–' if vs is None else f'{vs:.2f}'} "
            f"| {_mb(max(r['peak_rss_bytes']))} | {_mb(max(r['fault_bytes_per_step']))} "
            f"| {'–' if None in sent else _mb(max(sent))} | {r['final_loss']:.6f} |\n"
        )
    return out


def _yes(ok: bool) -> str:
    return "met" if ok else "missed"


def plots(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    main = {e: r for e, r in report["main"].items() if "step_s" in r}
    names = list(main)

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    vals = [main[e]["vs_ddp"] or 0 for e in names]
    colors = ["tab:orange" if e.startswith("hf_zero") else "tab:gray" for e in names]
    ax.barh(names, vals, color=colors)
    ax.axvline(1.0, color="k", lw=1)
    ax.invert_yaxis()
    ax.set_xlabel("step time / DDP step time")
    ax.set_title(f"{report['config']['model']}, {report['config']['world_size']} ranks")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    made.append(_save(fig, out_dir / "step_time_ratio.png"))

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(names, [max(main[e]["state_bytes"]) / MB for e in names], color=colors)
    ax.scatter(
        [main[e]["formula_bytes"] / MB for e in names],
        names,
        marker="|",
        s=400,
        color="k",
        label="ZeRO formula",
        zorder=3,
    )
    ax.invert_yaxis()
    ax.set_xlabel("model-state bytes per rank (MB)")
    ax.legend(loc="lower right")
    made.append(_save(fig, out_dir / "memory_per_rank.png"))

    sweep = [r for r in report["model_sweep"] if "step_s" in r]
    if sweep:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for e in dict.fromkeys(r["engine"] for r in sweep):
            pts = sorted((r["numel"], r) for r in sweep if r["engine"] == e)
            xs = [p / 1e6 for p, _ in pts]
            a1.plot(xs, [r["step_s"] for _, r in pts], marker="o", label=e)
            a2.plot(xs, [max(r["state_bytes"]) / MB for _, r in pts], marker="o", label=e)
        a1.set(xlabel="parameters (M)", ylabel="s / step", title="step time vs model size")
        a2.set(xlabel="parameters (M)", ylabel="MB per rank", title="model states vs model size")
        a1.legend(fontsize=7)
        made.append(_save(fig, out_dir / "scaling_model_size.png"))

    sweep = [r for r in report["world_size_sweep"] if "step_s" in r]
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4))
        for e in dict.fromkeys(r["engine"] for r in sweep):
            pts = sorted((r["world_size"], r) for r in sweep if r["engine"] == e)
            line = ax.plot(
                [n for n, _ in pts], [max(r["state_bytes"]) / MB for _, r in pts], "o-", label=e
            )[0]
            ax.plot(
                [n for n, _ in pts],
                [r["formula_bytes"] / MB for _, r in pts],
                "--",
                color=line.get_color(),
                lw=1,
            )
        ax.set_xticks(sorted({r["world_size"] for r in sweep}))
        ax.set(
            xlabel="ranks (N)",
            ylabel="model-state MB per rank",
            title=f"{report['config']['model']}: measured (solid), formula (dashed)",
        )
        ax.legend(fontsize=7)
        made.append(_save(fig, out_dir / "scaling_world_size.png"))
    return made


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


WIRE_PAIRS = (("hf_zero2_sparse", "hf_zero2_bert"), ("hf_zero3_q8", "hf_zero3"))
LINKS_GBIT = (10, 100)


def wire_table(results: dict[str, dict]) -> list[str]:
    """Sparse embedding gradients and int8 collectives against their exact engines of the same
    run: step time as measured, bytes per step (comm_stats, rank 0), and the transfer time those
    bytes would take on slower links (bytes / bandwidth), with what it saves per step."""
    rows = []
    for engine, peer in WIRE_PAIRS:
        a, b = results.get(engine, {}), results.get(peer, {})
        if "step_s" not in a or "step_s" not in b or "comm_bytes_per_step" not in a:
            continue
        ba = a["comm_bytes_per_step"][0]["total"]
        bb = b["comm_bytes_per_step"][0]["total"]
        link = " | ".join(
            f"{ba * 8 / (g * 1e9) * 1e3:.2f} vs {bb * 8 / (g * 1e9) * 1e3:.2f} "
            f"(saves {(bb - ba) * 8 / (g * 1e9) * 1e3:.2f})"
            for g in LINKS_GBIT
        )
        rows.append(
            f"| {engine} vs {peer} | {a['step_s']:.3f} vs {b['step_s']:.3f} | {_mb(ba)} vs "
            f"{_mb(bb)} ({bb / ba:.2f}x fewer) | {link} |"
        )
    if not rows:
        return []
    head = " | ".join(f"modelled ms/step at {g} Gbit/s" for g in LINKS_GBIT)
    return [
        "What crosses the wire: sparse embedding gradients (exact; BERT shaped like "
        "all-MiniLM-L6-v2) and int8 parameter all-gather + gradient reduce-scatter (lossy) "
        "against their exact engines of this run. Step time as measured here (loopback, "
        "shared CPU cores: quantizing may cost more than it saves); bytes per rank per step "
        "from `comm_stats()`; the modelled transfer time is bytes / bandwidth, what a slower "
        "link would spend on the same traffic.",
        "",
        f"| engine vs exact | s/step | MB/step | {head} |",
        "|---|---|---|" + "---|" * len(LINKS_GBIT),
        *rows,
        "",
    ]


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        f"# hf_zero benchmark: {c['model']} ({report['main_numel'] / 1e6:.1f}M parameters), "
        f"{c['world_size']} ranks on {c['device']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, "
        f"torch {report['machine']['torch']}"
        + (f", GPU {report['machine']['gpu']}" if "gpu" in report["machine"] else "")
        + (
            f", DeepSpeed {report['machine']['deepspeed']}"
            if "deepspeed" in report["machine"]
            else ""
        ),
        f"Batch {c['batch']} per rank, sequence {c['seq']}, fp32 AdamW, {c['warmup']} warm-up + "
        f"{c['steps']} measured steps; s/step is the median over steps of the slowest rank"
        + (
            f", then the median of {c['rounds']} rounds run round-robin (range in brackets); "
            "the ratios are the median of the per-round ratios (engine ÷ DDP or peer in the "
            "same round). "
            if c.get("rounds", 1) > 1
            else ". "
        )
        + "Every engine gets the same `torch.optim.AdamW(lr=1e-4, weight_decay=0.01)`; the AdamW "
        "kernel column says which implementation stepped it: torch's default (a for-loop on "
        "CPU), or the fused kernel, which the `_fused` rows ask for and hf_zero picks for its "
        "flat shards when the optimizer leaves the choice to torch. Minor faults: fresh pages "
        "a rank touched per measured step (getrusage, median over steps, slowest rank), a "
        "load-independent measure of memory churn.",
        "",
        main_table(report["main"]),
    ]
    lines += wire_table(report["main"])
    if report["targets"]:
        lines += ["| target | measured | |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {ok} |" for t, m, ok in report["targets"]]
        lines.append("")
    if report.get("accumulation", {}).get("results"):
        lines += [accum_table(report["accumulation"])]
    if report["consolidation"]:
        lines += [
            "Consolidation of the ZeRO-3 checkpoints to fp32 safetensors (fresh process each):",
            "",
            "| tool | call (s) | process (s) | peak RSS (MB) | imports alone (MB) | output (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for tool, r in report["consolidation"].items():
            if "error" in r:
                lines.append(f"| {tool} | FAILED | | | | |")
                continue
            lines.append(
                f"| {tool} | {r['consolidate_s']:.2f} | {r['process_s']:.2f} "
                f"| {_mb(r['peak_rss_bytes'])} | {_mb(r['import_only_peak_rss_bytes'])} "
                f"| {_mb(r['export_bytes'])} |"
            )
        lines.append("")
    if report["model_sweep"]:
        lines += ["Scaling with model size:", "", sweep_table(report["model_sweep"], "model")]
    if report["world_size_sweep"]:
        lines += ["Memory with N:", "", sweep_table(report["world_size_sweep"], "N")]
    if report["problems"]:
        lines += ["**Correctness problems:**", ""] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"
