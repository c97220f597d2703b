"""bench.json -> the Markdown tables of bench.md (and of the terminal)."""
from __future__ import annotations


def markdown(result: dict) -> str:
    env, peak = result["environment"], result["peak"]
    lines = [f"# rewardserve bench on {env['device']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}, commit "
             f"{env['commit'] or 'unknown'}; peak {peak['flops'] / 1e12:.2f} TFLOP/s ({peak['matmul']} matmul); "
             f"{_workload(result['workload'])}.", ""]
    if result.get("serve"):
        shared = result["workload"]["name"] == "G"  # every row counts the tokens sent, and says what was computed
        title, last, key = (("## serve, workload G (sent tokens/s; computed/sent: what the forward ran)",
                             "ratio to core, sharing on | computed/sent", "computed_per_sent") if shared else
                            ("## serve", "ratio to core | padded/real", "padded_per_real"))
        lines += [title, "", f"| model | row | tokens/s | sequences/s | MFU | p50 | p99 | {last} | passes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for block in result["serve"]:
            for r in block["rows"]:
                lines.append(f"| {block['model']} | {r['row']} | {r['tokens_per_s']:,.0f} | {r['sequences_per_s']:,.1f}"
                             f" | {_f(r['mfu'] and 100 * r['mfu'], 1, '%')} | {_s(r['p50_s'])} | {_s(r['p99_s'])} |"
                             f" {r['ratio_to_core']:.2f} | {_f(r.get(key))} | {r['passes']} |")
        for block in result["serve"]:
            if chosen := block.get("server_forward"):
                calibration = chosen["calibration"]
                lines += ["", f"The server's calibration ({block['model']}, {calibration['how']},"
                              f" {calibration['seconds']:.1f} s) chose {chosen['forward_path']} at"
                              f" {chosen['max_batch_tokens']:,} tokens a batch:", "",
                          "| path | budget | tokens/s | peak MiB | note |", "|---|---|---|---|---|"]
                chosen_key = (chosen["forward_path"], chosen["max_batch_tokens"])
                lines += [f"| {c['path']} | {c['budget']:,} | {_f(c['tokens_per_s'], 0)} |"
                          f" {_f(c['peak_bytes'] and c['peak_bytes'] / 2**20, 0)} |"
                          f" {'chosen' if (c['path'], c['budget']) == chosen_key else c['skipped'] or ''} |"
                          for c in calibration["candidates"]]
        notes = {r["note"] for block in result["serve"] for r in block["rows"] if r["note"]}
        lines += [""] + [f"Note: {note}." for note in sorted(notes)] + ([""] if notes else [])
    if result.get("ppo"):
        paths = {s.get("generation/path") for p in result["ppo"] for s in p["steps"]}
        lines_note = f"Decode path: {', '.join(sorted(str(p) for p in paths))}."
    if result.get("train"):
        lines += ["## train (one epoch, 16 pairs a step, lr 1e-5)", "",
                  "| model | data | train pairs | ours pairs/s | TRL pairs/s | speed-up | speed-up after step 1"
                  " | ours step 1 s | ours accuracy | TRL accuracy | length-only accuracy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in result["train"]:
            trl = t["trl"]
            lines.append(f"| {t['model']} | {t['data']} | {t['train_pairs']} | {t['ours']['pairs_per_s']:.1f} |"
                         f" {_f(trl.get('pairs_per_s'), 1) if 'pairs_per_s' in trl else trl.get('skipped', '-')} |"
                         f" {_f(t['speedup'], 2, 'x')} | {_f(t.get('speedup_after_first_step'), 2, 'x')} |"
                         f" {_f(t['ours'].get('first_step_s'), 1)} |"
                         f" {_f(t['ours']['accuracy'], 3)} | {_f(trl.get('accuracy'), 3)}"
                         f" | {_f(t['ours']['length_only_accuracy'], 3)} |")
        lines += ["", "Prompts shared (hh-rlhf: each pair's conversation computed once, or not; pairs/s after step 1):",
                  "", "| model | pairs | shared pairs/s | unshared pairs/s | speed-up |", "|---|---|---|---|---|"]
        for t in result["train"]:
            shared = t.get("shared_prompts") or {"skipped": "not measured"}
            if "skipped" in shared:
                lines.append(f"| {t['model']} | {shared['skipped']} | - | - | - |")
                continue
            lines.append(f"| {t['model']} | {shared['pairs']} | {_f(shared['pairs_per_s_shared'], 1)} |"
                         f" {_f(shared['pairs_per_s_unshared'], 1)} | {_f(shared['speedup'], 2, 'x')} |")
        lines.append("")
    if result.get("ppo"):
        lines += ["## ppo (after one warm-up step)", "",
                  "| model | rollouts x new tokens | estimator, group | step | generation tokens/s | decode steps"
                  " | generate s | score wait s | update s | step s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in result["ppo"]:
            group = f"{p.get('advantage_estimator', 'gae')}, {p.get('samples_per_prompt', 1)}" + \
                (", fsdp" if p.get("sharding") == "fsdp" else "")
            for s in p["steps"]:
                lines.append(f"| {p['model']} | {p['rollouts']} x {p['max_new_tokens']} | {group} | {s['step']} |"
                             f" {_f(s['generation/tokens_per_s'], 0)} |"
                             f" {s['generation/decode_steps']} | {_f(s['time/generate'], 2)} | {_f(s['time/score_wait'], 2)}"
                             f" | {_f(s['time/update'], 2)} | {_f(s['time/step'], 2)} |")
        lines += ["", lines_note, ""]
    return "\n".join(lines)


def _workload(workload: dict) -> str:
    if workload["name"] == "G":
        return (f"workload G: {workload['groups']} groups, {workload['sequences']} sequences, {workload['tokens']:,}"
                f" tokens sent{'' if workload['complete'] else ' (the first groups of G, not all of it)'}")
    return (f"workload W: {workload['sequences']} sequences, {workload['tokens']:,} tokens"
            f"{'' if workload['complete'] else ' (the first of W, not all of it)'}")


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"
