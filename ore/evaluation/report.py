"""Presenting results: the plain stdout table and the atomically written JSON file."""

from __future__ import annotations


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def format_table(result: dict, title: str | None = None) -> str:
    """The evaluator's result as a plain-text table (per-class rows, then the summary).

    Per-class recall and precision columns appear when ``result`` has them
    (``evaluate(details=True)``).
    """
    lines = [title] if title else []
    per_ap = result["per_class_ap"]
    recall = result.get("per_class_recall")
    precision = result.get("per_class_precision")
    npos = result.get("num_positives")
    ndet = result.get("num_detections")
    width = max([len("class"), *(len(n) for n in per_ap)])
    header = f"{'class':<{width}}  {'AP50':>7}"
    if recall is not None:
        header += f"  {'recall':>7}  {'prec':>7}  {'#gt':>7}  {'#det':>8}"
    lines += [header, "-" * len(header)]
    for name, ap in per_ap.items():
        row = f"{name:<{width}}  {_fmt(ap):>7}"
        if recall is not None:
            row += (f"  {_fmt(recall[name]):>7}  {_fmt(precision[name]):>7}"
                    f"  {npos[name]:>7}  {ndet[name]:>8}")
        lines.append(row)
    lines.append("")
    wi = result["wilderness_impact"]
    coco = result.get("coco") or {}
    summary = [
        ("known mAP50 previous", _fmt(result["known_mAP_prev"])),
        ("known mAP50 current", _fmt(result["known_mAP_current"])),
        ("known mAP50 both", _fmt(result["known_mAP_both"])),
        ("unknown recall (U-Recall)", _fmt(result["unknown_recall"])),
        ("unknown precision", _fmt(result["unknown_precision"])),
        ("unknown AP50", _fmt(result["unknown_ap"])),
        ("WI @ recall 0.8", _fmt(wi.get("0.8"), 4)),
        ("WI @ 0.1 .. 0.9", " ".join(_fmt(wi[k], 4) for k in sorted(wi))),
        ("A-OSE", _fmt(result["a_ose"])),
        ("UDR / UDP", f"{_fmt(result['udr'])} / {_fmt(result['udp'])}"),
        ("COCO AP / AP50 / AP75 (known)",
         " / ".join(_fmt(coco.get(k)) for k in ("AP", "AP50", "AP75"))),
    ]
    key_width = max(len(k) for k, _ in summary)
    lines += [f"{k:<{key_width}}  {v}" for k, v in summary]
    lines.append("(AP, mAP, recall, precision, UDR, UDP in %; WI a fraction; A-OSE a count)")
    lines.append(protocol_line(result))
    return "\n".join(lines)


def protocol_line(result: dict) -> str:
    """Which protocol produced ``result``: every listed line, or each image once."""
    name = result.get("protocol")
    if name is None:
        return "(protocol: not recorded)"
    n, m = result.get("listed_lines"), result.get("unique_images")
    if name == "listed-lines":
        how = "each listed line counted, as the published figures"
    else:
        how = "each image counted once"
    return f"(protocol {name}: {n} listed lines, {m} unique images; {how}; COCO AP per image)"
