"""The console's pages (GET): overview, stock, orders, one order, alerts, suppliers, login."""

from __future__ import annotations

from aiohttp import web

from agent.console.app import CONSOLE, SESSION, Console
from agent.console.charts import RANGES, bucket_sales, runway_bar, sales_chart
from agent.console.data import read_overview, read_stock, search_lines
from agent.console.labels import duration
from agent.domain import LineState

MAX_ORDERS_SHOWN = 500
# The states a merchant's refund is offered in (agent/store/ledger/alerts.py refuses the rest).
REFUNDABLE = (
    LineState.NEW,
    LineState.BACKORDERED,
    LineState.DELIVERED,
    LineState.NEEDS_ATTENTION,
)
# The states whose lines have keys bound, so that revealing them means something.
STATES_WITH_KEYS = frozenset(
    {
        LineState.ALLOCATED,
        LineState.DELIVERING,
        LineState.DELIVERED,
        LineState.NEEDS_ATTENTION,
    }
)


def _console(request: web.Request) -> Console:
    return request.app[CONSOLE]


async def login_page(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    session = request[SESSION]
    if session is not None and session.authenticated:
        raise web.HTTPSeeOther("/")
    fresh = session is None
    if fresh:
        session = console.sessions.create(console.clock())
        request[SESSION] = session
    response = console.render(request, "login.html")
    if fresh:
        console.set_cookie(request, response, session.id)
    return response


async def overview(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    figures = console.cache.get("overview")
    if figures is None:
        figures = await read_overview(console.store, console.clock())
        console.cache.put("overview", figures)
    running = console.engine.snapshot() if console.engine is not None else None
    return console.render(request, "overview.html", o=figures, running=running)


async def stock(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    _ = console.translator(request)
    chart = RANGES.get(request.query.get("range", "day"), RANGES["day"])
    now = console.clock()
    balances = console.engine.balances if console.engine is not None else {}
    key = f"stock:{chart.name}"
    rows = console.cache.get(key)
    if rows is None:
        rows = await read_stock(
            console.config, console.store, balances, console.clock, now - chart.seconds
        )
        console.cache.put(key, rows)
    cards = []
    for row in rows:
        f = row.forecast
        title = _("Keys sold per bar, %(sku)s") % {"sku": f.sku}
        cards.append(
            {
                "row": row,
                "chart": sales_chart(bucket_sales(row.sales, now, chart), chart, title, _("keys")),
                "runway": runway_bar(
                    f.time_to_empty,
                    row.lead_time,
                    _("Stock lasts %(empty)s; lead time %(lead)s")
                    % {
                        "empty": duration(_, f.time_to_empty),
                        "lead": duration(_, row.lead_time),
                    },
                    _("empty in %(d)s") % {"d": duration(_, f.time_to_empty)},
                    _("lead time %(d)s") % {"d": duration(_, row.lead_time)},
                ),
                "short": f.time_to_empty is not None and f.time_to_empty < row.lead_time,
            }
        )
    return console.render(
        request,
        "stock.html",
        cards=cards,
        range=chart.name,
        skus=sorted(console.config.skus),
    )


async def orders(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    query = request.query.get("q", "").strip()
    state_text = request.query.get("state", "")
    state = LineState(state_text) if state_text in {s.value for s in LineState} else None
    sku = request.query.get("sku", "").strip()
    platform = request.query.get("platform", "").strip()
    try:
        limit = max(1, min(MAX_ORDERS_SHOWN, int(request.query.get("limit", "50"))))
    except ValueError:
        limit = 50
    lines = await search_lines(console.store, query, state, sku, platform, limit)
    return console.render(
        request,
        "orders.html",
        lines=lines,
        q=query,
        state=state.value if state else "",
        sku=sku,
        platform=platform,
        limit=limit,
        states=list(LineState),
        skus=sorted(console.config.skus),
        platforms=[p.name for p in console.config.platforms],
    )


async def order(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    line_id = int(request.match_info["line_id"])
    line = await console.store.get_line(line_id)
    if line is None:
        raise web.HTTPNotFound(text="no such order line")
    events = await console.store.events(line_id)
    purchases = await console.store.purchases_for(line_id)
    return console.render(
        request,
        "order.html",
        line=line,
        events=events,
        purchases=purchases,
        can_retry=line.state == LineState.NEEDS_ATTENTION,
        can_resend=line.state == LineState.DELIVERED,
        can_refund=line.state in REFUNDABLE,
        has_keys=line.state in STATES_WITH_KEYS,
    )


async def alerts(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    return console.render(request, "alerts.html", alerts=await console.store.open_alerts())


async def suppliers(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    balances = console.engine.balances if console.engine is not None else {}
    rows = []
    for s in console.config.suppliers:
        balance = balances.get(s.name)
        low = balance is not None and s.balance_low is not None and balance.amount < s.balance_low
        rows.append({"settings": s, "balance": balance, "low": low})
    skus = [
        {"sku": sku.sku, "sources": sku.sources, "max_price": sku.max_price}
        for sku in console.config.skus.values()
    ]
    return console.render(request, "suppliers.html", suppliers=rows, skus=skus)


async def import_progress(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    job = console.imports.get(request.match_info["job_id"])
    if job is None:
        raise web.HTTPNotFound(text="no such import")
    return console.render(request, "import.html", job=job)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_page)
    app.router.add_get("/", overview)
    app.router.add_get("/stock", stock)
    app.router.add_get("/stock/import/{job_id}", import_progress)
    app.router.add_get("/orders", orders)
    app.router.add_get(r"/orders/{line_id:\d{1,18}}", order)
    app.router.add_get("/alerts", alerts)
    app.router.add_get("/suppliers", suppliers)
