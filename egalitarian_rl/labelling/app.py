"""The labelling web app (Starlette): annotators compare two segments; an admin watches the groups emerge.

Routes (``TOKEN`` is an annotator's, ``ADMIN`` the admin's token):

* ``GET /u/TOKEN`` -- the labelling page (403 for an unknown token). Its script sends the token in
  the ``X-Token`` header of every API call.
* ``GET /api/next`` -- the next pair for this user, chosen by the campaign's query rule.
* ``GET /api/media/SEGMENT`` -- a segment's clip (GIF).
* ``POST /api/answer`` -- JSON ``{"query_id": int, "choice": "left" | "right" | "equal" | "skip"}``.
  200 once committed (``duplicate: true`` for a repeat), 400 unreadable body, 422 wrong fields or
  unknown query, 409 a different answer to an answered query, 403 bad token (nothing stored).
* ``GET /admin/ADMIN`` -- answers per user, agreement between users, the groups EM finds so far;
  ``POST /admin/ADMIN/fit`` fits EM now.

Tokens are never logged in full (uvicorn's access log is replaced by one that redacts them) and
pages are sent with ``Referrer-Policy: no-referrer`` so a link never leaks through a referrer.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from egalitarian_rl.labelling.queries import DisagreementRule, QueryRule, segment_member_returns
from egalitarian_rl.labelling.store import CHOICES, AnswerStore, StoreError, User, hash_token, is_swapped, redact

logger = logging.getLogger("egalitarian_rl.labelling")
TOKEN_HEADER = "X-Token"
MAX_BODY_BYTES = 4096


# --------------------------------------------------------------------------- EM in the background
@dataclass
class FitResult:
    """What the admin page shows of the last EM fit.

    :param n_answers: answers the fit used; ``shares`` ``(K,)``; ``members`` user id -> member;
        ``confidence`` user id -> posterior of that member.
    """

    n_answers: int
    fitted_at: float
    seconds: float
    shares: list[float]
    members: dict[int, int]
    confidence: dict[int, float]
    mixture: Any = field(repr=False, default=None)


class MixtureFitter:
    """Fits the EM mixture on the exported answers, at most one fit at a time, in a thread.

    :param store: the campaign's answers.
    :param make_mixture: builds an unfitted :class:`~egalitarian_rl.rewards.EMRewardMixture`.
    :param min_answers: fewer answers than this (or fewer users than members): no fit.
    :param refit_every: fit again in the background after this many new answers (0 = only on request).
    :param on_fit: called with every new result (e.g. to refresh an active query rule).
    """

    def __init__(
        self,
        store: AnswerStore,
        make_mixture: Callable[[], Any],
        min_answers: int = 20,
        refit_every: int = 0,
        on_fit: Callable[[FitResult], None] | None = None,
    ) -> None:
        self.store, self.make_mixture = store, make_mixture
        self.min_answers, self.refit_every, self.on_fit = min_answers, refit_every, on_fit
        self.result: FitResult | None = None
        self.error: str | None = None
        self._busy = threading.Lock()
        #: Stored answers (skips included) when the last fit started: what ``refit_every`` counts from.
        self._answers_at_last_fit = 0

    def fit(self) -> FitResult | None:
        """Fit now (blocking); ``None`` when there is not enough data or another fit is running."""
        if not self._busy.acquire(blocking=False):
            return None
        try:
            answers = self.store.n_answers()
            data = self.store.export_dataset() if answers else None
            mixture = self.make_mixture()
            if data is None or len(data) < self.min_answers or data.n_users < mixture.n_components:
                return None
            start = time.perf_counter()
            self._answers_at_last_fit = answers
            mixture.fit(data)
            posterior = mixture.predict_proba(data)
            users = data.users.tolist()
            self.result = FitResult(
                n_answers=len(data),
                fitted_at=time.time(),
                seconds=time.perf_counter() - start,
                shares=[float(s) for s in mixture.shares_],
                members=dict(zip(users, mixture.assignments_.tolist())),
                confidence={u: float(posterior[i, mixture.assignments_[i]]) for i, u in enumerate(users)},
                mixture=mixture,
            )
            self.error = None
            if self.on_fit is not None:
                self.on_fit(self.result)
            return self.result
        except Exception as err:  # a failed fit must not take the labelling down; the admin page shows it
            self.error = f"{type(err).__name__}: {err}"
            logger.exception("EM fit failed")
            return None
        finally:
            self._busy.release()

    def maybe_refit(self) -> None:
        """Start a background fit if ``refit_every`` new answers arrived since the last one."""
        if self.refit_every <= 0 or self._busy.locked():
            return
        if self.store.n_answers() - self._answers_at_last_fit >= max(self.refit_every, self.min_answers - self._answers_at_last_fit):
            threading.Thread(target=self.fit, daemon=True, name="em-fit").start()


def rule_refresher(store: AnswerStore, rule: QueryRule) -> Callable[[FitResult], None]:
    """An ``on_fit`` hook that points an active rule at the new mixture (nothing for a random rule)."""

    def refresh(result: FitResult) -> None:
        if not isinstance(rule, DisagreementRule):
            return
        _, pairs = store.queries()
        segment_ids, positions = np.unique(pairs, return_inverse=True)
        returns = segment_member_returns(result.mixture, store.segments(segment_ids))
        rule.update(result.mixture, returns, positions.reshape(pairs.shape), store.export_dataset())

    return refresh


# --------------------------------------------------------------------------- agreement
def pairwise_agreement(answers: list[tuple[int, int, str, float | None]]) -> dict[tuple[int, int], tuple[float, int]]:
    """``(user i, user j) -> (share of shared strict answers on which they agree, how many)``, for i < j.

    :param answers: ``(user_id, query_id, choice, label)`` rows (skips and "equal" are ignored).
    """
    by_query: dict[int, dict[int, float]] = {}
    for user, query, _choice, label in answers:
        if label is not None and label != 0.5:
            by_query.setdefault(query, {})[user] = label
    tally: dict[tuple[int, int], list[int]] = {}
    for labels in by_query.values():
        users = sorted(labels)
        for i, a in enumerate(users):
            for b in users[i + 1 :]:
                counts = tally.setdefault((a, b), [0, 0])
                counts[0] += int(labels[a] == labels[b])
                counts[1] += 1
    return {pair: (agree / n, n) for pair, (agree, n) in tally.items()}


# --------------------------------------------------------------------------- pages
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h1{font-size:1.3rem;margin:0 0 .5rem} .muted{color:#666}
#pair{display:flex;gap:1.5rem;margin:1rem 0}
.side{flex:1;background:#fff;border:1px solid #ddd;border-radius:8px;padding:1rem;text-align:center}
.side img{width:100%;max-width:240px;image-rendering:pixelated} .side h2{font-size:1rem;margin:.2rem 0 .6rem}
.prompt{color:#555;font-style:italic;text-align:left} .completion{text-align:left;white-space:pre-wrap}
#buttons{display:flex;gap:.8rem;justify-content:center}
button{font-size:1rem;padding:.6rem 1.1rem;border-radius:6px;border:1px solid #888;background:#fff;cursor:pointer}
button:disabled{opacity:.5} kbd{background:#eee;border:1px solid #bbb;border-radius:3px;padding:0 .3rem;font-size:.85em}
table{border-collapse:collapse;margin:.5rem 0 1.2rem} td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
"""

_LABEL_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>
<body>
<h1>{title}</h1>
<p class="muted">Hello {name}. Which of the two behaviours do you prefer? Answered: <span id="count">{count}</span>.</p>
<div id="pair" data-query-id="">
  <div class="side" id="left"><h2>Left</h2><div class="content"></div></div>
  <div class="side" id="right"><h2>Right</h2><div class="content"></div></div>
</div>
<div id="buttons">
  <button id="btn-left" data-choice="left">Left is better <kbd>&larr;</kbd> <kbd>1</kbd></button>
  <button id="btn-equal" data-choice="equal">Equal <kbd>=</kbd> <kbd>3</kbd></button>
  <button id="btn-skip" data-choice="skip">Can't tell <kbd>s</kbd> <kbd>4</kbd></button>
  <button id="btn-right" data-choice="right">Right is better <kbd>&rarr;</kbd> <kbd>2</kbd></button>
</div>
<p id="status" class="muted" role="status">Loading...</p>
<script>
const token = decodeURIComponent(location.pathname.split("/").pop());
const headers = {{"X-Token": token}};
let current = null, busy = false, urls = [];
const keys = {{ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", "=": "equal", "3": "equal", s: "skip", "4": "skip"}};
function setBusy(b) {{ busy = b; document.querySelectorAll("button").forEach(x => x.disabled = b || !current); }}
async function show(side, view) {{
  const box = document.querySelector("#" + side + " .content");
  box.replaceChildren();
  if (view.media) {{
    const r = await fetch(view.media, {{headers}});
    const url = URL.createObjectURL(await r.blob()); urls.push(url);
    const img = document.createElement("img"); img.src = url; img.alt = side + " clip"; box.append(img);
  }}
  if (view.prompt !== null && view.prompt !== undefined) {{
    const p = document.createElement("p"); p.className = "prompt"; p.textContent = view.prompt; box.append(p);
  }}
  if (view.text !== null && view.text !== undefined) {{
    const c = document.createElement("p"); c.className = "completion"; c.textContent = view.text; box.append(c);
  }}
}}
async function next() {{
  setBusy(true);
  urls.forEach(u => URL.revokeObjectURL(u)); urls = [];
  const r = await fetch("/api/next", {{headers}});
  if (!r.ok) {{ document.getElementById("status").textContent = "Error " + r.status + ": this link is not valid."; return; }}
  const q = await r.json();
  document.getElementById("count").textContent = q.answered;
  if (q.done) {{ current = null; document.getElementById("pair").dataset.queryId = "";
    document.getElementById("status").textContent = "All done, thank you!"; setBusy(false); return; }}
  current = q.query_id;
  await Promise.all([show("left", q.left), show("right", q.right)]);
  document.getElementById("pair").dataset.queryId = String(q.query_id);
  document.getElementById("status").textContent = "Pair " + q.query_id + ": choose with the buttons or the keys.";
  setBusy(false);
}}
async function answer(choice) {{
  if (busy || current === null) return;
  setBusy(true);
  const r = await fetch("/api/answer", {{method: "POST", headers: {{...headers, "Content-Type": "application/json"}},
                                         body: JSON.stringify({{query_id: current, choice}})}});
  if (!r.ok) {{
    document.getElementById("status").textContent = "Not saved (error " + r.status + "), please retry.";
    setBusy(false); return;
  }}
  await next();
}}
document.querySelectorAll("button").forEach(b => b.addEventListener("click", () => answer(b.dataset.choice)));
document.addEventListener("keydown", e => {{ const c = keys[e.key]; if (c) {{ e.preventDefault(); answer(c); }} }});
next();
</script>
</body></html>
"""


def _page(title: str, body: str) -> str:
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style>'
    return f'<!doctype html><html lang="en"><head>{head}</head><body>{body}</body></html>'


def _admin_body(campaign: Campaign) -> str:
    store, fitter = campaign.store, campaign.fitter
    users = store.users()
    names = {u.id: u.name for u in users}
    counts = store.answer_counts()
    group_names = store.get_meta("group_names", [])
    result = fitter.result if fitter else None
    rows = []
    for user in users:
        c = counts[user.id]
        member = "" if result is None or user.id not in result.members else f"{result.members[user.id]} ({result.confidence[user.id]:.2f})"
        true = group_names[user.true_group] if group_names and user.true_group >= 0 else ""
        cells = [html.escape(user.name), str(sum(c.values())), *(str(c[k]) for k in CHOICES), member, html.escape(true)]
        rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("user", "answers", *CHOICES, "EM member (posterior)", "true group"))
    agreement = pairwise_agreement(store.answers())
    agree_rows = "".join(
        f"<tr><td>{html.escape(names.get(a, str(a)))}</td><td>{html.escape(names.get(b, str(b)))}</td><td>{share:.2f}</td><td>{n}</td></tr>"
        for (a, b), (share, n) in sorted(agreement.items())[:200]
    )
    if result is None:
        em = "<p>No EM fit yet" + (f" (needs at least {fitter.min_answers} answers)" if fitter else "") + ".</p>"
    else:
        shares = ", ".join(f"member {k}: {s:.2f}" for k, s in enumerate(result.shares))
        em = (
            f"<p>Last fit on {result.n_answers} answers, {time.strftime('%H:%M:%S', time.localtime(result.fitted_at))} "
            f"({result.seconds:.1f} s). Shares: {shares}.</p>"
        )
    if fitter and fitter.error:
        em += f"<p>Last fit failed: {html.escape(fitter.error)}</p>"
    return (
        f"<h1>{html.escape(campaign.title)}: admin</h1>"
        f"<p>{store.n_answers()} answers from {len(users)} annotators; {len(store.queries()[0])} candidate pairs; "
        f"rule: {campaign.rule_name}.</p>"
        f"<h2>Answers per user</h2><table><tr>{head}</tr>{''.join(rows)}</table>"
        f"<h2>Agreement between users</h2><p>Share of strict answers on the same pair that agree.</p>"
        f"<table><tr><th>user</th><th>user</th><th>agreement</th><th>shared pairs</th></tr>{agree_rows}</table>"
        f'<h2>Groups EM finds</h2>{em}<form method="post" action="{html.escape(campaign.admin_path)}/fit">'
        "<button>Fit EM now</button></form>"
    )


# --------------------------------------------------------------------------- the app
@dataclass
class Campaign:
    """Everything the app serves from: the store, the query rule, EM and the admin token's hash.

    :param admin_token_hash: :func:`~egalitarian_rl.labelling.store.hash_token` of the admin token.
    :param rng: draws the random parts of query picks.
    """

    store: AnswerStore
    rule: QueryRule
    admin_token_hash: str
    fitter: MixtureFitter | None = None
    title: str = "Which behaviour is better?"
    rule_name: str = "random"
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    admin_path: str = ""

    def next_query(self, user: User) -> int | None:
        """The query id to show ``user`` next, or ``None`` when they have answered every candidate."""
        query_ids, _ = self.store.queries()
        available = np.flatnonzero(~np.isin(query_ids, self.store.asked_queries(user.id)))
        picked = self.rule.select(user.id, available, 1, self.rng)
        return int(query_ids[picked[0]]) if len(picked) else None


def _user(campaign: Campaign, request: Request) -> User | None:
    return campaign.store.user_for_token(request.headers.get(TOKEN_HEADER))


def _is_admin(campaign: Campaign, token: str) -> bool:
    return hmac.compare_digest(hash_token(token), campaign.admin_token_hash)


def _forbidden() -> JSONResponse:
    return JSONResponse({"error": "unknown or missing token"}, status_code=403)


def _segment_view(campaign: Campaign, segment_id: int) -> dict[str, Any]:
    view = campaign.store.segment_view(segment_id) or {}
    return {
        "media": f"/api/media/{segment_id}" if view.get("media") is not None else None,
        "prompt": view.get("prompt"),
        "text": view.get("text"),
    }


def _parse_answer(body: bytes) -> tuple[int, str] | JSONResponse:
    """``(query_id, choice)`` from a POST body, or the 400 / 422 response explaining what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        return JSONResponse({"error": f"body larger than {MAX_BODY_BYTES} bytes"}, status_code=400)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return JSONResponse({"error": "body is not JSON"}, status_code=400)
    if not isinstance(payload, dict) or set(payload) != {"query_id", "choice"}:
        return JSONResponse({"error": 'expected exactly {"query_id": int, "choice": str}'}, status_code=422)
    query_id, choice = payload["query_id"], payload["choice"]
    if isinstance(query_id, bool) or not isinstance(query_id, int):
        return JSONResponse({"error": "query_id must be an integer"}, status_code=422)
    if choice not in CHOICES:
        return JSONResponse({"error": f"choice must be one of {list(CHOICES)}"}, status_code=422)
    return query_id, choice


def create_app(campaign: Campaign) -> Starlette:
    """The Starlette app serving ``campaign``."""

    async def label_page(request: Request) -> Response:
        user = campaign.store.user_for_token(request.path_params["token"])
        if user is None:
            return HTMLResponse(_page("Not allowed", "<h1>This link is not valid.</h1>"), status_code=403)
        body = _LABEL_PAGE.format(
            title=html.escape(campaign.title), style=_STYLE, name=html.escape(user.name), count=campaign.store.n_answers(user.id)
        )
        return HTMLResponse(body)

    def next_pair(request: Request) -> Response:
        user = _user(campaign, request)
        if user is None:
            return _forbidden()
        query_id = campaign.next_query(user)
        answered = campaign.store.n_answers(user.id)
        if query_id is None:
            return JSONResponse({"done": True, "answered": answered})
        a, b = campaign.store.query_pair(query_id)  # type: ignore[misc]
        left, right = (b, a) if is_swapped(user.id, query_id) else (a, b)
        return JSONResponse(
            {
                "done": False,
                "query_id": query_id,
                "answered": answered,
                "left": _segment_view(campaign, left),
                "right": _segment_view(campaign, right),
            }
        )

    def media(request: Request) -> Response:
        if _user(campaign, request) is None:
            return _forbidden()
        view = campaign.store.segment_view(request.path_params["segment_id"])
        if view is None or view["media"] is None:
            return JSONResponse({"error": "no such clip"}, status_code=404)
        return Response(view["media"], media_type="image/gif")

    async def answer(request: Request) -> Response:
        user = _user(campaign, request)
        if user is None:
            return _forbidden()
        parsed = _parse_answer(await request.body())
        if isinstance(parsed, JSONResponse):
            return parsed
        query_id, choice = parsed
        try:
            # Blocking SQLite commit off the event loop; the response is sent only after it.
            receipt = await run_in_threadpool(campaign.store.record_answer, user.id, query_id, choice)
        except StoreError as err:
            status = 409 if "already answered" in str(err) else 422
            return JSONResponse({"error": str(err)}, status_code=status)
        if campaign.fitter is not None and receipt.stored:
            campaign.fitter.maybe_refit()
        return JSONResponse({"stored": receipt.stored, "duplicate": receipt.duplicate})

    async def admin(request: Request) -> Response:
        if not _is_admin(campaign, request.path_params["token"]):
            return HTMLResponse(_page("Not allowed", "<h1>Not allowed.</h1>"), status_code=403)
        campaign.admin_path = request.url.path
        body = await run_in_threadpool(_admin_body, campaign)
        return HTMLResponse(_page(f"{campaign.title}: admin", body))

    async def admin_fit(request: Request) -> Response:
        token = request.path_params["token"]
        if not _is_admin(campaign, token):
            return HTMLResponse(_page("Not allowed", "<h1>Not allowed.</h1>"), status_code=403)
        if campaign.fitter is not None:
            await run_in_threadpool(campaign.fitter.fit)
        return RedirectResponse(f"/admin/{token}", status_code=303)

    async def health(_request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/u/{token}", label_page),
            Route("/api/next", next_pair),
            Route("/api/media/{segment_id:int}", media),
            Route("/api/answer", answer, methods=["POST"]),
            Route("/admin/{token}", admin),
            Route("/admin/{token}/fit", admin_fit, methods=["POST"]),
            Route("/health", health),
        ],
        middleware=[Middleware(HeadersAndLog)],
    )


class HeadersAndLog:
    """ASGI middleware: privacy headers on every response, and an access log with tokens redacted."""

    _HEADERS = [(b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *self._HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
        logger.info("%s %s %d %.0f ms", scope["method"], redact_path(scope["path"]), status[0], 1000 * (time.perf_counter() - start))


def redact_path(path: str) -> str:
    """``path`` with the token of ``/u/TOKEN`` and ``/admin/TOKEN[/...]`` shortened to 4 characters."""
    parts = path.split("/")
    if len(parts) > 2 and parts[1] in ("u", "admin"):
        parts[2] = redact(parts[2])
    return "/".join(parts)
