"""What a frozen-encoder evaluation reports: the setting chosen on validation (never on the test) among a grid of
heads, k values or probes, as probe_results.json entries, a markdown table and log lines."""

from __future__ import annotations


def choose_on_validation(val: list[dict]) -> int:
    """The column with the best validation top-1 (the first of equals): the test never chooses."""
    return max(range(len(val)), key=lambda j: (val[j]["top1"], -j))


def result_entry(name: str, val: dict, test: dict, **extra) -> dict:
    def short(summary: dict) -> dict:
        return {k: summary[k] for k in ("top1", "top5", "mean_class_accuracy", "num_scored", "num_videos")}

    return {"name": name, **extra, "val": short(val), "test": short(test)}


# The methods a probe run reports, as probe_results.json names them, and their titles in probe_results.md.
METHODS = {"linear": "Linear heads", "knn": "k-NN", "attentive": "Attentive probes"}


def results_table(results: dict) -> str:
    """probe_results.md: one table per method, rows by validation top-1, the chosen row marked."""
    lines = [f"# Frozen-encoder probes of {results['encoder'] or 'a randomly initialised encoder'}", ""]
    for method, title in METHODS.items():
        if method not in results:
            continue
        block = results[method]
        lines += [f"## {title} (chosen on validation: {block['chosen']['name']})", "",
                  "| | setting | val top-1 | val top-5 | test top-1 | test top-5 |", "|---|---|---:|---:|---:|---:|"]
        rows = sorted(block["all"], key=lambda e: -e["val"]["top1"])
        for entry in rows:
            mark = "**chosen**" if entry["name"] == block["chosen"]["name"] else ""
            lines.append(f"| {mark} | {entry['name']} | {100 * entry['val']['top1']:.2f} | "
                         f"{100 * entry['val']['top5']:.2f} | {100 * entry['test']['top1']:.2f} | "
                         f"{100 * entry['test']['top5']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def describe_results(results: dict) -> str:
    """One log line per method: the setting chosen on validation and its scores."""
    lines = []
    for method in METHODS:
        if method in results:
            chosen = results[method]["chosen"]
            lines.append(f"{method}: chosen on validation {chosen['name']}: val top-1 {100 * chosen['val']['top1']:.2f}"
                         f", test top-1 {100 * chosen['test']['top1']:.2f} top-5 {100 * chosen['test']['top5']:.2f}"
                         f" ({chosen['test']['num_scored']} of {chosen['test']['num_videos']} test videos)")
    return "\n".join(lines)
