"""The Gradio 6 user interface. Thin: every handler calls `LeaderboardService` or `ChatService`.

Named API endpoints (for `gradio_client`): /board, /board_csv, /submit, /submission, /chat,
/profile, /admin.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from leaderboard.about import about_markdown
from leaderboard.chat import ChatService, parse_profile, profile_text
from leaderboard.service import (ALL_COLUMNS, METRIC_COLUMNS, SCORE_COLUMNS, LeaderboardService,
                                 _fmt_pct)
from pesc.errors import PescError

log = logging.getLogger("pesc.leaderboard")

ALWAYS_COLUMNS = ["rank", "id", "team", "system"]
OPTIONAL_COLUMNS = [c for c in ALL_COLUMNS if c not in ALWAYS_COLUMNS]
DEFAULT_COLUMNS = ["date", "total (no G)", "total (with G)", "corrected total", *METRIC_COLUMNS,
                   "KL", "flags"]
NEEDS_JUDGE = {"total (with G)", "G-Score"}
TURN_COLUMNS = ["dialogue", "turn", "turn score", "METEOR", "BLEU-4", "ROUGE-L", "Extrema",
                "seeker turn", "reply"]
FLAG_RULES = ["all", "unflagged", "flagged"]
# Why each gaming flag matters (the flag's own message says what was measured).
FLAG_HELP = {
    "copied_seeker": "Echoing the seeker's own words scores well on METEOR and ROUGE-L without "
                     "answering them; the echo baseline shows how far that alone goes.",
    "repeated_reply": "One reply used again and again keeps Extrema high while saying nothing "
                      "specific; compare the generic baseline.",
    "length_outlier": "Much longer replies raise recall-oriented metrics (METEOR, ROUGE-L), much "
                      "shorter ones lower Distinct's denominator; both distort the comparison.",
    "long_responses": "Replies longer than any reference pad the overlap metrics.",
    "distinct2_inflated": "Distinct-n rewards unusual wording regardless of quality; values far "
                          "above the references' suggest noise or padding.",
    "distinct3_inflated": "Distinct-n rewards unusual wording regardless of quality; values far "
                          "above the references' suggest noise or padding.",
    "empty_responses": "Blank replies score zero on every per-turn metric.",
    "empty_submission": "There is nothing to score.",
}
TURN_WIDTHS = ["70px", "50px", "70px", "75px", "70px", "75px", "75px"]
CSS = """
#lb-table table td { white-space: nowrap; }
.lb-status { font-size: 1.05em; }
"""


def _datatypes(columns: list[str]) -> list[str]:
    numeric = set(SCORE_COLUMNS) | set(METRIC_COLUMNS) | {"KL", "id"}
    return ["number" if c in numeric else "str" for c in columns]


def top_plot(df: pd.DataFrame):
    """Grouped bars: the official metrics (x 100) of the top entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=100)
    if df.empty:
        ax.text(0.5, 0.5, "no team submissions yet", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
        fig.tight_layout()
        return fig
    metrics = list(dict.fromkeys(df["metric"]))
    entries = list(dict.fromkeys(df["entry"]))
    table = df.pivot_table(index="metric", columns="entry", values="value").reindex(
        index=metrics, columns=entries)
    x = np.arange(len(metrics), dtype=np.float32)
    width = 0.8 / len(entries)
    for i, entry in enumerate(entries):
        ax.bar(x + (i - (len(entries) - 1) / 2) * width, table[entry].to_numpy(np.float32), width,
               label=entry)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("score x 100")
    ax.set_title("Top entries (official mode)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def problems_frame(problems: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"dialogue": p.get("dialogue_id") or "", "turn": "" if p.get("turn") is None
                          else str(p["turn"]), "problem": p.get("code", ""),
                          "message": p.get("message", "")} for p in problems],
                        columns=["dialogue", "turn", "problem", "message"])


def problems_markdown(problems: list[dict], limit: int = 200) -> str:
    lines = []
    for p in problems[:limit]:
        where = []
        if p.get("dialogue_id") is not None:
            where.append(f"dialogue **{p['dialogue_id']}**")
        if p.get("turn") is not None:
            where.append(f"turn **{p['turn']}**")
        lines.append(f"- {', '.join(where) + ': ' if where else ''}{p.get('message', '')} "
                     f"(`{p.get('code', '')}`)")
    if len(problems) > limit:
        lines.append(f"- ... and {len(problems) - limit} more")
    return "\n".join(lines)


def submission_header(d: dict) -> str:
    who = "◆ baseline" if d["kind"] == "baseline" else f"team **{d['team']}**"
    rank = f"rank **{d['rank']}**" if d.get("rank") else ("baseline" if d["kind"] == "baseline"
                                                        else "unranked")
    off, cor = d["official"] or {}, d["corrected"] or {}
    lines = [f"### Submission #{d['id']}: {who}, system **{d['system']}**",
             f"{rank} · submitted {d['created_at']:%Y-%m-%d %H:%M} UTC · file `{d['upload_name']}`"
             f" · result sha256 `{d['result_sha'][:12]}`"]
    if d.get("stale"):
        lines.append("> ⚠ scored against a different gold file than the server's current one.")
    lines.append("")
    lines.append("| | total (no G) | total (with G) | METEOR | BLEU-4 | ROUGE-L | Extrema | D-2 | D-3 | G |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def cells(m, total, total_g):
        vals = [total, total_g] + [m.get(k) for k in ("meteor", "bleu4", "rougeL", "extrema",
                                                    "distinct2", "distinct3", "gscore")]
        return " | ".join("–" if v is None else f"{_fmt_pct(v):.2f}" for v in vals)

    lines.append(f"| official | {cells(off, d['total'], d['total_g'])} |")
    if cor:
        lines.append(f"| corrected | {cells(cor, d['corrected_total'], None)} |")
    kl = d.get("kl")
    if kl:
        lines.append("")
        lines.append(f"**KL(teacher || student)** at temperature {kl.get('temperature', 1):g}: "
                     f"{kl['per_token_mean']:.4f} per token; {kl['per_example_sum_mean']:.3f} per "
                     f"example (sum over its tokens), on {kl.get('n_examples')} reference turns "
                     f"({kl.get('n_tokens')} tokens), teacher `{kl.get('teacher', '?')}`, model "
                     f"`{d.get('model_ref')}`.")
    elif d.get("kl_status"):
        lines.append("")
        lines.append(f"**KL** for `{d.get('model_ref')}`: {d['kl_status']}")
    return "\n".join(lines)


def flags_markdown(d: dict) -> str:
    parts = []
    if d["flags"]:
        parts.append("#### Flags")
        for f in d["flags"]:
            sev = f.get("severity", "")
            why = FLAG_HELP.get(f["code"], "")
            parts.append(f"- **{f['code']}**{f' ({sev})' if sev else ''}: {f['message']}."
                         f"{' _' + why + '_' if why else ''}")
    else:
        parts.append("#### Flags\nNone: nothing in this submission looks like a baseline or a "
                     "gamed metric.")
    if d["notes"]:
        parts.append("#### Notes from the scorer")
        parts += [f"- {n}" for n in d["notes"]]
        parts.append("")
    access = d["reference_access"]
    if access == "none":
        parts.append("_The operator shows aggregate scores only on this server._")
    elif access == "scores":
        parts.append("_Reference replies are not disclosed on this server; per-turn scores are "
                     "shown beside the seeker turn and the reply, worst turns first._")
    else:
        parts.append("_Worst turns first (turn score = (0.2 METEOR + 0.2 BLEU-4 + 0.2 ROUGE-L + "
                     "0.1 Extrema) / 0.7)._")
    return "\n".join(parts)


def turn_widths(n_text_columns: int) -> list[str]:
    share = f"{(100 - 28) // n_text_columns}%"
    return TURN_WIDTHS + [share] * n_text_columns


def turns_frame(d: dict) -> pd.DataFrame:
    cols = TURN_COLUMNS + (["reference"] if d["reference_access"] == "full" else [])
    rows = []
    for t in d["per_turn"]:
        row = {"dialogue": t["dialogue_id"], "turn": t["turn"],
               "turn score": _fmt_pct(t["turn_score"]), "METEOR": _fmt_pct(t["meteor"]),
               "BLEU-4": _fmt_pct(t["bleu4"]), "ROUGE-L": _fmt_pct(t["rougeL"]),
               "Extrema": _fmt_pct(t["extrema"]), "seeker turn": t["seeker"],
               "reply": t["prediction"]}
        if "reference" in t:
            row["reference"] = t["reference"]
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def build_app(service: LeaderboardService, chat: ChatService | None = None) -> gr.Blocks:
    cfg = service.config
    chat = chat or ChatService(cfg.models)
    csv_dir = Path(tempfile.mkdtemp(prefix="pesc-leaderboard-"))
    profiles = service.gold.profiles()

    # ----------------------------------------------------------- handlers
    def board(query: str, flagged: str, include_baselines: bool, columns: list[str]):
        df = service.board(include_baselines=bool(include_baselines), query=query or "",
                           flagged=flagged or "all", columns=list(ALWAYS_COLUMNS) + list(columns or []))
        status = "" if service.baseline_status == "ready" else \
            f"_Baselines: {service.baseline_status}._"
        return (gr.Dataframe(value=df, datatype=_datatypes(list(df.columns))),
                top_plot(service.top_metrics(5)), status)

    def board_csv(query: str, flagged: str, include_baselines: bool, columns: list[str]):
        # one directory per request (concurrent users never share a file); old ones are pruned
        now = time.time()
        for old in csv_dir.iterdir():
            if now - old.stat().st_mtime > 600:
                shutil.rmtree(old, ignore_errors=True)
        path = Path(tempfile.mkdtemp(dir=csv_dir)) / "pesc-leaderboard.csv"
        service.board_csv(path, include_baselines=bool(include_baselines), query=query or "",
                          flagged=flagged or "all",
                          columns=list(ALWAYS_COLUMNS) + list(columns or OPTIONAL_COLUMNS))
        return str(path)

    def submit(file, team, system, model_ref, progress=gr.Progress()):
        progress(0.0, desc="starting")
        path = file if isinstance(file, (str, type(None))) else getattr(file, "name", None)
        outcome = service.submit(path, team, system, model_ref,
                                 upload_name=Path(path).name if path else None,
                                 progress=lambda f, m: progress(min(max(f, 0.0), 1.0), desc=m))
        verdict = ("Accepted" if outcome.created else "Already on the board" if outcome.ok
                   else "Not stored")
        status = f"{'✅' if outcome.ok else '❌'} **{verdict}**: {outcome.message}"
        if outcome.ok and outcome.summary:
            s = outcome.summary

            def pct(v):
                return "–" if v is None else f"{_fmt_pct(v):.2f}"

            rank = f"rank {s['rank']}, " if s.get("rank") else ""
            status += (f"\n\n{rank}total (no G) **{pct(s['total'])}**, corrected total "
                       f"**{pct(s['corrected_total'])}**. [Open submission #{outcome.submission_id}]"
                       f"(?submission={outcome.submission_id}) (or the Submission tab, id "
                       f"{outcome.submission_id}).")
        probs = outcome.problems
        return (status, gr.Markdown(value=problems_markdown(probs), visible=bool(probs)),
                outcome.as_dict(),
                gr.Number(value=outcome.submission_id) if outcome.submission_id else gr.Number())

    def open_submission(sub_id):
        empty = pd.DataFrame(columns=TURN_COLUMNS)
        try:
            sid = int(sub_id)
        except (TypeError, ValueError):
            return "Type a submission id (the `id` column of the board).", "", empty
        d = service.detail(sid)
        if d is None:
            return f"No visible submission #{sid}.", "", empty
        df = turns_frame(d)
        return (submission_header(d), flags_markdown(d),
                gr.Dataframe(value=df, column_widths=turn_widths(len(df.columns) - len(TURN_WIDTHS))))

    def select_row(evt: gr.SelectData):
        row = evt.row_value or []
        sid = None
        if len(row) > 1:
            try:
                sid = int(row[1])  # "id" is always the second column
            except (TypeError, ValueError):
                sid = None
        header, flags, turns = open_submission(sid)
        return gr.Tabs(selected="submission"), sid, header, flags, turns

    def on_load(request: gr.Request):
        raw = request.query_params.get("submission") if request is not None else None
        if raw:
            sid = int(raw) if raw.strip().isdigit() else None
            header, flags, turns = open_submission(sid)
            return gr.Tabs(selected="submission"), sid, header, flags, turns
        return gr.Tabs(), None, "", "", pd.DataFrame(columns=TURN_COLUMNS)

    def pick_profile(dialogue_id):
        return profile_text(profiles.get(str(dialogue_id), {})) if dialogue_id else ""

    def chat_respond(message, history, profile_json, model_name):
        try:
            profile = parse_profile(profile_json)
        except PescError as e:
            raise gr.Error(str(e))
        for h in chat.respond(message, history, profile, model_name):
            yield h, ""

    def chat_reset():
        return [], ""

    def admin(token, action, sub_id):
        try:
            return "✅ " + service.admin(token, action, None if sub_id in (None, "") else int(sub_id))
        except PescError as e:
            return f"❌ {e}"

    # --------------------------------------------------------------- layout
    # uploaded files live in Gradio's cache: swept hourly, kept a day (the database has a copy)
    with gr.Blocks(title=cfg.title, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {cfg.title}\nNLPCC 2025 shared task 8, Personalized Emotional Support "
                    f"Conversation. Reference file: `{service.gold.path.name}` "
                    f"({len(service.gold.dialogues)} dialogues, {service.gold.n_turns} supporter turns).")
        with gr.Tabs(selected="board") as tabs:
            with gr.Tab("Leaderboard", id="board"):
                with gr.Row():
                    query = gr.Textbox(label="Search team, system or #id", scale=3)
                    flagged = gr.Radio(FLAG_RULES, value="all", label="Flags", scale=2)
                    include_baselines = gr.Checkbox(value=True, label="Show baselines", scale=1)
                with gr.Accordion("Columns", open=False):
                    columns = gr.CheckboxGroup(
                        OPTIONAL_COLUMNS, show_label=False,
                        value=[c for c in DEFAULT_COLUMNS
                               if cfg.judge is not None or c not in NEEDS_JUDGE])
                baseline_note = gr.Markdown()
                table = gr.Dataframe(interactive=False, show_search="filter", elem_id="lb-table",
                                     label=f"Ranked by the official total "
                                           f"{'with' if cfg.judge is not None else 'without'} G "
                                           "(x 100); click a row to open it",
                                     max_height=600, wrap=False)
                with gr.Row():
                    refresh = gr.Button("Refresh", size="md")
                    csv_btn = gr.DownloadButton("Download CSV", size="md")
                plot = gr.Plot(label="Metrics of the top entries", format="png")
            with gr.Tab("Submit", id="submit"):
                gr.Markdown("Upload your submission `.zip` (with exactly one `result.json`) or a bare "
                            "`result.json`. It is checked first; only a valid file is scored and "
                            "stored. See the About tab for the rules.")
                with gr.Row():
                    with gr.Column():
                        upload = gr.File(label="Submission (.zip or result.json)",
                                         type="filepath",
                                         elem_id="lb-upload")
                    with gr.Column():
                        team = gr.Textbox(label="Team", max_lines=1, elem_id="lb-team")
                        system = gr.Textbox(label="System name", max_lines=1, elem_id="lb-system")
                        model_ref = gr.Textbox(label="Model for KL (optional: local path or Hub id)",
                                               max_lines=1)
                submit_btn = gr.Button("Check and submit", variant="primary", elem_id="lb-submit")
                status = gr.Markdown(elem_classes=["lb-status"], elem_id="lb-status")
                problems = gr.Markdown(visible=False, elem_id="lb-problems")
                with gr.Accordion("Receipt (machine-readable)", open=False):
                    receipt = gr.JSON(label="Receipt")
            with gr.Tab("Submission", id="submission"):
                with gr.Row():
                    sub_id = gr.Number(label="Submission id", precision=0, minimum=1, scale=1)
                    open_btn = gr.Button("Open", scale=0)
                header = gr.Markdown(elem_id="lb-sub-header")
                flags_md = gr.Markdown()
                turns = gr.Dataframe(interactive=False, wrap=True, label="Per-turn scores, worst first",
                                     max_height=700, show_search="search")
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    with gr.Column(scale=1):
                        model_dd = gr.Dropdown(chat.models, value=chat.models[0] if chat.models else None,
                                               label="Model", allow_custom_value=False)
                        profile_dd = gr.Dropdown(sorted(profiles), value=None,
                                                 label="Profile from the data (dialogue id)")
                        profile_box = gr.Code(language="json", label="Profile (edit, or type your own)",
                                              lines=12, interactive=True)
                    with gr.Column(scale=2):
                        chatbot = gr.Chatbot(label="Conversation", height=480)
                        msg = gr.Textbox(label="Your message", placeholder="Say how you feel...",
                                         max_lines=4)
                        with gr.Row():
                            send = gr.Button("Send", variant="primary")
                            reset = gr.Button("Reset")
                gr.Markdown("_A research model, not a counsellor. If you are thinking about "
                            "harming yourself, please contact your local emergency number or a "
                            "crisis line (see the About tab)._")
            with gr.Tab("About", id="about"):
                gr.Markdown(about_markdown(cfg, judge=cfg.judge is not None))
                with gr.Accordion("Organisers: admin", open=False):
                    if service.admin_enabled():
                        gr.Markdown("Hide, delete or re-score entries. Needs the admin token.")
                    else:
                        gr.Markdown("Admin actions are disabled: the server was started without "
                                    "`$PESC_LEADERBOARD_ADMIN_TOKEN`.")
                    with gr.Row():
                        token = gr.Textbox(label="Admin token", type="password")
                        action = gr.Radio(["hide", "unhide", "delete", "rescore", "rescore_all"],
                                          value="hide", label="Action")
                        admin_id = gr.Number(label="Submission id", precision=0)
                    admin_btn = gr.Button("Apply", variant="stop")
                    admin_out = gr.Markdown()

        board_inputs = [query, flagged, include_baselines, columns]
        board_outputs = [table, plot, baseline_note]
        reads = dict(concurrency_limit=4)
        demo.load(board, board_inputs, board_outputs, api_name="board", **reads)
        private = dict(api_visibility="private")
        demo.load(on_load, None, [tabs, sub_id, header, flags_md, turns], api_name="deep_link",
                  **private)
        demo.load(board_csv, board_inputs, csv_btn, api_name="board_csv_on_load", **private)
        for i, trigger in enumerate((query.submit, flagged.change, include_baselines.change,
                                     columns.change)):
            trigger(board, board_inputs, board_outputs, api_name=f"board_refresh_{i}", **private,
                    **reads).then(board_csv, board_inputs, csv_btn, api_name=f"board_csv_{i}",
                                  **private)
        refresh.click(board, board_inputs, board_outputs, api_name="board_refresh", **private,
                      **reads).then(board_csv, board_inputs, csv_btn, api_name="board_csv", **reads)
        submit_btn.click(submit, [upload, team, system, model_ref], [status, problems, receipt, sub_id],
                         api_name="submit", concurrency_limit=cfg.submit_concurrency,
                         concurrency_id="submit").then(
            board, board_inputs, board_outputs, api_name="board_after_submit", **private)
        open_btn.click(open_submission, sub_id, [header, flags_md, turns], api_name="submission",
                       **reads)
        sub_id.submit(open_submission, sub_id, [header, flags_md, turns], api_name="submission_enter",
                      **private)
        table.select(select_row, None, [tabs, sub_id, header, flags_md, turns],
                     api_name="open_row", **private)
        profile_dd.change(pick_profile, profile_dd, profile_box, api_name="profile")
        chat_args = dict(inputs=[msg, chatbot, profile_box, model_dd], outputs=[chatbot, msg],
                         concurrency_limit=1, concurrency_id="chat")
        send.click(chat_respond, api_name="chat", **chat_args)
        msg.submit(chat_respond, api_name="chat_enter", **private, **chat_args)
        reset.click(chat_reset, None, [chatbot, msg], api_name="chat_reset")
        admin_btn.click(admin, [token, action, admin_id], admin_out, api_name="admin",
                        concurrency_limit=1).then(board, board_inputs, board_outputs,
                                                  api_name="board_after_admin", **private)
    demo.queue(default_concurrency_limit=2)
    return demo


def launch(service: LeaderboardService, chat: ChatService | None = None, *, host: str = "127.0.0.1",
           port: int = 7860, block: bool = True, quiet: bool = False):
    """Build and start the app. Returns (demo, url). Gradio's own size cap sits above ours so that
    our message (with the limit) is the one a submitter sees."""
    demo = build_app(service, chat)
    blocked = [str(service.config.gold.resolve())]
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                            quiet=quiet, show_error=True,
                            max_file_size=2 * service.config.limits.max_upload_bytes,
                            blocked_paths=blocked, footer_links=["api"], theme=gr.themes.Soft(),
                            css=CSS)
    return demo, url
