"""The report's sections for Stages 1 to 3, each HTML text built from that stage's files alone (Stage 4's is
in answers.py).

    stage1   r's candidates over positions x blocks (bypass, induce, KL), the chosen r outlined; the teacher
             grid's selectivity per block and c
    stage2   S as a table (votes, mean Δ, mean score, hits in Stage 4's answers), πt's continuations marked
    stage3   per student: loss terms, learning rate, seconds and sampled refusal per step; refreshes marked
"""
from __future__ import annotations

from html import escape

from safesteer.report.svg import finite, heat_map, line_chart, number

ABLATION_NOTE = ("bypass: refusal score of harmful prompts with r ablated (lower removes more refusal); "
                 "induce: of harmless prompts with r added (higher causes more); KL: how far ablating r "
                 "moves harmless prompts' next token. The chosen r is outlined.")


def shown(token: str) -> str:
    """A token as the tables show it: spaces as ␣, other invisible characters escaped:
    shown(" no\\n") == '␣no\\\\n'."""
    return "".join("␣" if ch == " " else ch if ch.isprintable() else repr(ch)[1:-1] for ch in token)


def position_name(token) -> str:
    """A post-instruction token as shown(), or a name such as '<response mean>' as it is."""
    token = str(token)
    return token if token.startswith("<") and token.endswith(">") else shown(token)


def marked(parts: list[str]) -> str:
    """split_at's parts as HTML: the odd ones (S's tokens) in <mark class="s">."""
    out = []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            out.append(escape(part))
        else:
            kind = "s nl" if "\n" in part else "s"
            out.append(f'<mark class="{kind}">{escape(part)}</mark>')
    return "".join(out)


def absent(title: str, files: str) -> str:
    return f'<p class="absent">{escape(title)} did not run in this directory (no {escape(files)}).</p>'


def facts(pairs: list[tuple[str, object]]) -> str:
    """A definition list of the (label, value) pairs whose value is not None."""
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in pairs if v is not None)
    return f'<dl class="facts">{rows}</dl>'


def percent(x) -> str | None:
    return f"{100 * x:.0f}%" if finite(x) else None


def verdict(refuses) -> str:
    """The phrase judge's verdict as a tag: refuses or complies."""
    if refuses is None:
        return ""
    word = "refuses" if refuses else "complies"
    return f' <span class="tag {word}">{word}</span>'


# ----------------------------------------------------------------------------- Stage 1

def stage1(run) -> str:
    d, c = run.direction or {}, run.candidates or {}
    if not (d or c):
        return absent("Stage 1", "direction.json or candidates.json")
    check = run.steering or d.get("steering_check") or {}
    scores = d.get("scores") or {}
    position = f"{d['position']} ({position_name(d.get('position_token', ''))})" if "position" in d else None
    ablation = " / ".join(number(scores.get(k)) for k in ("bypass", "induce", "kl")) if scores else None
    steering = None
    if check:
        steering = f"{percent(check.get('refusal_rate_base'))} → {percent(check.get('refusal_rate_steered'))}"
    out = [facts([("direction", d.get("kind")), ("block l*", d.get("layer")), ("position", position),
                  ("c", d.get("coefficient")), ("|r|", number(d.get("norm"))),
                  ("chosen by", d.get("selection_rule")), ("fallback used", d.get("fallback_used")),
                  ("its bypass / induce / KL", ablation), ("steering check: refusal π0 → πt", steering)])]
    rows = c.get("candidates") or []
    if len(rows) == 1:
        out.append("<p>One candidate was scored: the teacher grid below chose its block and c first, and its "
                   "bypass / induce / KL scores are the ones above.</p>")
    elif rows:
        out.append(candidate_maps(rows, c.get("skipped") or [], d))
    out += teacher_grids(c, d)
    return "".join(out)


def candidate_maps(rows: list[dict], skipped: list[dict], d: dict) -> str:
    """Three heat maps over positions x blocks, the chosen r outlined in each."""
    positions = {r["position"]: f"{r['position']} {position_name(r.get('token', ''))}" for r in rows}
    labels = [positions[p] for p in sorted(positions)]
    layers = [str(l) for l in sorted({r["layer"] for r in rows})]
    chosen = {(positions.get(d.get("position")), str(d.get("layer")))}
    maps = []
    for key in ("bypass", "induce", "kl"):
        values = {(positions[r["position"]], str(r["layer"])): r.get(key) for r in rows}
        picture = heat_map(labels, layers, values, marked=chosen)
        maps.append(f"<figure><figcaption>{key}</figcaption>{picture}</figure>")
    gaps = f"; {len(skipped)} skipped (zero direction)" if skipped else ""
    return (f"<p>{len(rows)} candidate directions r[position, block] scored on the validation prompts{gaps}. "
            f"{ABLATION_NOTE}</p><div class=\"row\">{''.join(maps)}</div>")


def teacher_grids(c: dict, d: dict) -> list[str]:
    """The grid of --teacher-grid: first-token selectivity per block (its ranking), then the judged one."""
    out = []
    ranked, grid = c.get("teachers_ranked") or [], c.get("teachers") or []
    if ranked:
        cells = {(f"c = {t['coefficient']}", str(t["layer"])): t for t in ranked}
        values = {k: t.get("first_token_selectivity") for k, t in cells.items()}
        tips = {k: f"p(R) harmful {number(t.get('p_r_harmful'))}, harmless {number(t.get('p_r_harmless'))}, "
                   f"KL {number(t.get('teacher_kl'))}" for k, t in cells.items()}
        cols = [str(l) for l in sorted({t["layer"] for t in ranked})]
        picture = heat_map(sorted({k[0] for k in cells}), cols, values, tips=tips)
        out.append("<p>Teacher grid, ranking: πt = π0 + c·r at each block, scored by first-token selectivity "
                   "(the probability of a refusal token on harmful minus on harmless validation prompts).</p>"
                   f"{picture}")
    if grid:
        cells = {(f"c = {t['coefficient']}", str(t["layer"])): t for t in grid}
        values = {k: t.get("selectivity") for k, t in cells.items()}
        tips = {k: f"refuses {percent(t.get('refusal_harmful'))} of harmful, "
                   f"{percent(t.get('refusal_harmless'))} of harmless" for k, t in cells.items()}
        rows = [f"c = {x}" for x in sorted({t["coefficient"] for t in grid})]
        cols = [str(l) for l in sorted({t["layer"] for t in grid})]
        chosen = {(f"c = {d.get('coefficient')}", str(d.get("layer")))}
        picture = heat_map(rows, cols, values, marked=chosen, tips=tips, cell=40)
        out.append("<p>Teacher grid, judged: the best blocks' greedy answers judged for refusal; "
                   "selectivity = refusal of harmful − of harmless validation prompts. The chosen teacher is "
                   "outlined.</p>"
                   f"{picture}")
    return out


# ----------------------------------------------------------------------------- Stage 2

def stage2(run, hl, models: list[str]) -> str:
    """S's table (with its hits in each model's Stage 4 answers, which hl counted) and πt's continuations."""
    t = run.tokens
    if not t:
        return absent("Stage 2", "safety_tokens.json")
    st, cov = t.get("settings") or {}, t.get("coverage") or {}
    drawn = f"{st.get('samples')}, {st.get('horizon')}" if st else None
    out = [facts([("|S|", len(t["token_ids"])), ("score", st.get("score")),
                  ("aggregate", st.get("aggregate")), ("K′ votes per position", st.get("k_vote")),
                  ("M samples, H tokens", drawn),
                  ("prompts", st.get("prompts")), ("positions scored", t.get("n_positions")),
                  *[(f"coverage on {k}", percent(v)) for k, v in cov.items()]]),
           "<p>Coverage: the share of the teacher's total-variation shift Σ|πt − π0| that falls on S. "
           f"Tokens marked in answers: {escape(hl.source)}.</p>", token_table(t, hl, models)]
    samples = (run.steering or {}).get("samples") or []
    if samples:
        base = hl.split([s.get("base", "") for s in samples])
        steered = hl.split([s.get("steered", "") for s in samples])
        cards = "".join(pair(s, b, p) for s, b, p in zip(samples, base, steered))
        out.append("<h3>The teacher's continuations, S marked</h3><p>Greedy answers of π0 and πt to "
                   f"Stage 1's check prompts (steering_check.json).</p>{cards}")
    return "".join(out)


def token_table(t: dict, hl, models: list[str]) -> str:
    """S in Stage 2's order: token, id, votes, mean Δ, mean score and, with a tokenizer, hits per model."""
    n = len(t["token_ids"])
    deltas, scores = t.get("mean_delta") or [None] * n, t.get("mean_score") or [None] * n
    score = "mean πt·Δ" if (t.get("settings") or {}).get("score") == "kl" else "mean score"
    counted = models if hl.tokenizer else []
    head = "".join(f"<th>in {escape(m)}'s answers</th>" for m in counted)
    rows = []
    for k, (i, tok, votes) in enumerate(zip(t["token_ids"], t["tokens"], t["votes"])):
        hits = "".join(f"<td>{hl.counts[(m, i)]}</td>" for m in counted)
        rows.append(f'<tr><td>{k + 1}</td><td><mark class="s">{escape(shown(tok))}</mark></td><td>{i}</td>'
                    f"<td>{votes}</td><td>{number(deltas[k])}</td><td>{number(scores[k], 4)}</td>{hits}</tr>")
    return ('<table class="tokens"><thead><tr><th>#</th><th>token</th><th>id</th><th>votes</th>'
            f"<th>mean Δ</th><th>{score}</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def pair(sample: dict, base: list[str], steered: list[str]) -> str:
    """One check prompt with π0's and πt's answers, S marked."""
    return (f'<div class="pair"><p class="prompt">{escape(sample["prompt"])}</p>'
            f'<div class="answer"><b>π0</b>{verdict(sample.get("base_refuses"))}'
            f'<div class="text">{marked(base)}</div></div>'
            f'<div class="answer"><b>πt</b>{verdict(sample.get("steered_refuses"))}'
            f'<div class="text">{marked(steered)}</div></div></div>')


# ----------------------------------------------------------------------------- Stage 3

LOSSES = [("loss", "loss trained"), ("collapsed", "collapsed: KL over S ∪ {R}"),
          ("partial", "partial: Σ over S"), ("full", "full: KL over V"),
          ("anchor_loss", "anchor term, toward π0")]
REFUSALS = [("sampled_refusal", "harmful prompts"), ("anchor_refusal", "anchors (harmless)")]
REFRESH_KEYS = ("teacher", "s_overlap", "direction_cosine", "coverage", "seconds")


def stage3(run) -> str:
    if not run.students:
        return absent("Stage 3", "student folder with train_log.jsonl")
    s_ids = (run.tokens or {}).get("token_ids")
    return "".join(student_block(s, s_ids) for s in run.students)


def recipe_facts(meta: dict, s_ids) -> str:
    """What safesteer.json says the student was trained with."""
    args, teacher = meta.get("args") or {}, meta.get("teacher") or {}
    own = meta.get("s_token_ids")
    which_s = None
    if own is not None and s_ids is not None:
        which_s = "Stage 2's" if own == s_ids else "random" if meta.get("random_tokens") else "another"
    budget = f"{args.get('prompts_per_step')} × {args.get('samples')} × {args.get('max_new_tokens')}"
    anchor = f"{', '.join(args['anchor'])} (λ = {args.get('anchor_weight')})" if args.get("anchor") else None
    hook = None
    if teacher:
        hook = f"{teacher.get('kind')} at block {teacher.get('layer')}, c = {teacher.get('coefficient')}"
    return facts([("loss", meta.get("loss") or meta.get("method")), ("steps", meta.get("steps")),
                  ("lr", args.get("lr")), ("P prompts × G samples × T tokens", budget if args else None),
                  ("anchor", anchor), ("teacher", hook), ("S", which_s), ("LoRA rank", meta.get("lora_rank")),
                  ("refresh every", meta.get("refresh_every")), ("teacher EMA", args.get("teacher_ema")),
                  ("seconds", meta.get("seconds"))])


def student_block(student, s_ids) -> str:
    """A student's recipe, its per-step charts (refreshes dashed) and the refreshes' numbers."""
    log = student.log
    steps = [r.get("step") for r in log]
    refreshes = [r for r in log if "teacher_refreshed" in r or "teacher_refresh" in r]
    marks = [r["step"] for r in refreshes]

    def series(pairs):
        return [(label, steps, [r.get(k) for r in log]) for k, label in pairs if any(k in r for r in log)]

    charts = [line_chart("loss per step", series(LOSSES), marks=marks),
              line_chart("learning rate", series([("lr", "lr")]), marks=marks),
              line_chart("seconds per step", series([("step_seconds", "seconds")]), marks=marks),
              line_chart("refusal of its own samples", series(REFUSALS), marks=marks)]
    drawn = "".join(c for c in charts if c)
    out = [f'<h3 id="student-{escape(student.name)}">{escape(student.name)}/</h3>',
           recipe_facts(student.meta, s_ids),
           f'<div class="row">{drawn}</div>' if log else '<p class="absent">no train_log.jsonl</p>']
    if refreshes:
        items = []
        for r in refreshes:
            info = r.get("teacher_refresh") or {"teacher": r.get("teacher_refreshed")}
            said = ", ".join(f"{k} {number(v) if finite(v) else v}" for k, v in info.items()
                             if k in REFRESH_KEYS)
            items.append(f"<li>after step {r['step']}: {escape(said)}</li>")
        out.append(f"<p>The schedule's refreshes (dashed lines):</p><ul>{''.join(items)}</ul>")
    return "".join(out)
