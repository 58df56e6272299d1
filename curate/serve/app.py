"""``curate serve``: the web app (FastAPI on uvicorn, Jinja2 templates, no JavaScript framework).

Pages: ``/rows/kept`` and ``/rows/rejected`` (image grids, filters by reason, stage, score range and
an SQL condition, orders; paginated at any depth: ``page=N`` or ``page=last``, ``after=`` / ``before=``
cursors, ``goto=N`` from the jump form), ``/search`` (text, similar-image upload, similar-to-row),
``/duplicates`` (a table of groups), ``/duplicate-groups`` (each group's kept image beside its copies)
and ``/duplicates/{uid}``, ``/sql`` (read-only SQL box); ``POST /subset`` saves the current
view as a complete curate output (refilter) or a DataComp uid file under the subsets folder;
``/thumb/{view}/{file}/{row}`` serves JPEG thumbnails of the stored image bytes.

Hostile input: every error is a 4xx page (or text) with one line; SQL is read-only (curate.sql_guard);
uploads are bounded (Content-Length checked before reading, then the image's own limits); the Host
header must name the bound address (no DNS rebinding) and a POST from another origin is refused.
"""


import logging
import socket
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from curate.io.files import InputError

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 20 << 20
PER_PAGE = 48
GROUP_PAGE = 48  # copies shown per page of one duplicate group


def _float(v: str | None) -> float | None:
    if v is None or str(v).strip() == "":
        return None
    try:
        x = float(v)
    except ValueError:
        raise InputError(f"not a number: {str(v)[:40]!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise InputError("not a finite number")
    return x


def _int(v: str | None, default: int, lo: int, hi: int) -> int:
    if v is None or str(v).strip() == "":
        return default
    try:
        return max(lo, min(hi, int(v)))
    except ValueError:
        raise InputError(f"not an integer: {str(v)[:40]!r}") from None


def create_app(output: str | Path, subsets_dir: str | Path | None = None, allowed_hosts: list[str] | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles
    from fastapi.templating import Jinja2Templates
    from starlette.exceptions import HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from curate.serve.data import Explorer
    from curate.sql_guard import SqlRefused

    ex = Explorer(output, subsets_dir)
    app = FastAPI(title="curate", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    tpl = Jinja2Templates(directory=str(TEMPLATES))
    tpl.env.globals["qs"] = lambda **kw: urlencode({k: v for k, v in kw.items() if v not in (None, "")})

    def render(request: Request, name: str, status: int = 200, **ctx: Any):
        ctx.setdefault("output", str(ex.layout.root))
        ctx.setdefault("refresh", False)
        return tpl.TemplateResponse(request, name, ctx, status_code=status)

    def error(request: Request, status: int, message: str):
        message = " ".join(str(message).split())[:500]
        if "text/html" in request.headers.get("accept", ""):
            return render(request, "message.html", status, title=f"Error {status}", message=message)
        return PlainTextResponse(message + "\n", status_code=status)

    @app.exception_handler(InputError)
    async def _input(request: Request, e: InputError):
        return error(request, 400, str(e))

    @app.exception_handler(FileExistsError)
    async def _exists(request: Request, e: FileExistsError):
        return error(request, 409, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        return error(request, 400, f"bad request: {'.'.join(map(str, first.get('loc', [])))}: {first.get('msg', '')}")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error(request, e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("serve: %s failed", request.url.path)
        return error(request, 500, f"internal error: {type(e).__name__}")

    @app.middleware("http")
    async def _same_origin(request: Request, call_next):
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
                return PlainTextResponse("cross-origin POST refused\n", status_code=403)
        return await call_next(request)

    @app.get("/")
    def index():
        return RedirectResponse("/rows/kept", status_code=303)

    @app.get("/rows/{view}", response_class=HTMLResponse)
    def rows(request: Request, view: str, reason: str = "", stage: str = "", metric: str = "", lo: str = "",
             hi: str = "", where: str = "", order: str = "", page: str = "0", per: str = str(PER_PAGE),
             after: str = "", before: str = "", goto: str = ""):
        if view not in ("kept", "rejected"):
            raise HTTPException(404, f"no view {view[:40]}")
        flt = ex.filter(reason=reason[:200], stage=stage[:200], metric=metric[:100], lo=_float(lo), hi=_float(hi),
                        where=where)
        last = page.strip() == "last"
        p, n = (0 if last else _int(page, 0, 0, 10 ** 9)), _int(per, PER_PAGE, 1, 200)
        if goto.strip():  # the jump form: 1-based
            p, last, after, before = max(0, _int(goto, 1, 1, 10 ** 9) - 1), False, "", ""
        items, w = ex.browse(view, flt, n, order[:120], page=p, after=after[:2000], before=before[:2000], last=last)
        params = dict(reason=reason, stage=stage, metric=metric, lo=lo, hi=hi, where=where, order=order, per=per)
        mode = "sorted" if order else "filtered" if (reason or stage or where.strip() or (
            metric and (lo.strip() or hi.strip()))) else "storage"
        pager = _pager(w, n, params, mode)
        return render(request, "rows.html", view=view, items=items, total=w.total, params=params, nav=pager,
                      window=w, mode=mode, facets=ex.facets(view), numeric=ex.numeric,
                      refresh=bool(w.pending))

    def _pager(w, per: int, params: dict[str, Any], mode: str) -> dict[str, Any]:
        """Links of a rows page: page numbers in storage order, cursors (keyset) in filtered and sorted views."""
        first = w.first
        page_no = first // per if first is not None else None
        last_no = max(0, (w.total - 1) // per) if w.total is not None else None
        links: dict[str, Any] = {}
        if w.has_prev:
            links["first"] = {**params, "page": 0}
            if mode == "storage" and first is not None and first % per == 0:
                links["prev"] = {**params, "page": page_no - 1}
            else:
                links["prev"] = {**params, "before": w.before}
        if w.has_next:
            if mode == "storage" and first is not None and first % per == 0:
                links["next"] = {**params, "page": page_no + 1}
            else:
                links["next"] = {**params, "after": w.after}
            links["last"] = {**params, "page": "last"}
        shown = len(w.files)
        return {"page": page_no, "last": last_no, "links": links, "first_row": first + 1 if first is not None else None,
                "last_row": (first + shown) if first is not None else None, "shown": shown,
                "jump": True,
                "counted": w.counted}

    @app.get("/thumb/{view}/{file}/{row}")
    def thumb(view: str, file: str, row: int):
        return Response(_thumb(view, file, row), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @lru_cache(maxsize=4096)
    def _thumb(view: str, file: str, row: int) -> bytes:
        from curate.row_reader import thumbnail_bytes

        data = ex.image_bytes(view, file, row)
        if data is None:
            raise HTTPException(404, "this row has no image")
        try:
            return thumbnail_bytes(data)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - an undecodable stored image
            raise HTTPException(422, f"cannot decode the stored image: {type(e).__name__}") from None

    def _results(request: Request, table, query: dict[str, Any]):
        """The cards of a search (``locate=True``: the hits carry their columns and where they are stored)."""
        items = [{**hit, "view": query["view"]} for hit in table.to_pylist()]
        return render(request, "search.html", items=items, query=query, uids=[i["uid"] for i in items])

    @app.get("/search", response_class=HTMLResponse)
    def search_page(request: Request, text: str = "", uid: str = "", view: str = "kept", k: str = "48",
                    where: str = ""):
        from curate.search import search

        query = {"text": text, "uid": uid, "view": view if view in ("kept", "rejected") else "kept",
                 "k": _int(k, 48, 1, 500), "where": where}
        if not text.strip() and not uid.strip():
            return render(request, "search.html", items=[], query=query, uids=[])
        table = search(ex.layout.root, text=text or None, uid=None if text else uid, k=query["k"],
                       where=where or None, view=query["view"], searcher=ex.searcher(), locate=True)
        return _results(request, table, query)

    @app.post("/search/image", response_class=HTMLResponse)
    async def search_image(request: Request):
        from curate.search import search

        size = request.headers.get("content-length")
        if size is None or not size.isdigit():
            raise HTTPException(411, "Content-Length required")
        if int(size) > MAX_UPLOAD + 64 * 1024:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD} bytes")
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise InputError("no image file in the form (field 'image')")
        data = await upload.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD} bytes")
        view = str(form.get("view") or "kept")
        query = {"text": "", "uid": "", "image": upload.filename or "upload",
                 "view": view if view in ("kept", "rejected") else "kept", "k": _int(form.get("k"), 48, 1, 500),
                 "where": str(form.get("where") or "")}
        table = search(ex.layout.root, image=data, k=query["k"], where=query["where"] or None, view=query["view"],
                       searcher=ex.searcher(), locate=True)
        return _results(request, table, query)

    @app.get("/duplicates", response_class=HTMLResponse)
    def duplicates(request: Request, page: str = "0", goto: str = ""):
        p = _int(page, 0, 0, 10 ** 9) if not goto.strip() else max(0, _int(goto, 1, 1, 10 ** 9) - 1)
        groups, total = ex.duplicate_groups(p, 100)
        if total < 0:
            return render(request, "message.html", title="duplicate groups", refresh=True,
                          message="writing the duplicate-groups table (once for these files); this page reloads")
        last = max(0, (total - 1) // 100)
        if p > last:
            p = last
            groups, total = ex.duplicate_groups(p, 100)
        return render(request, "duplicates.html", groups=groups, total=total, page=p, last=last)

    @app.get("/duplicate-groups", response_class=HTMLResponse)
    def duplicate_gallery(request: Request, page: str = "0", per: str = "20", shown: str = "12", goto: str = ""):
        p, n, k = _int(page if page != "last" else "0", 0, 0, 10 ** 9), _int(per, 20, 1, 100), _int(shown, 12, 1, 100)
        if goto.strip():  # the jump form: 1-based
            p, page = max(0, _int(goto, 1, 1, 10 ** 9) - 1), ""
        got = ex.duplicate_gallery(p, n, k)
        if got is None:
            return render(request, "message.html", title="duplicate groups", refresh=True,
                          message="writing the duplicate-groups table (once for these files); this page reloads")
        groups, total = got
        last = max(0, (total - 1) // n)
        if page == "last" or p > last:
            p = last
            groups, total = ex.duplicate_gallery(p, n, k)
        params = {"per": n, "shown": k}
        return render(request, "dup_gallery.html", groups=groups, total=total, page=p, last=last, params=params)

    @app.get("/duplicates/{uid}", response_class=HTMLResponse)
    def duplicate_group(request: Request, uid: str, page: str = "0"):
        p = _int(page, 0, 0, 10 ** 9)
        if ex.duplicate_table() is None:
            return render(request, "message.html", title="duplicate group", refresh=True,
                          message="writing the duplicate-groups table (once for these files); this page reloads")
        got = ex.duplicate_group_page(uid[:1000], p * GROUP_PAGE, GROUP_PAGE)
        if got is None:
            raise HTTPException(404, "no such duplicate group")
        group, keeper, members = got
        last = max(0, (group["members"] - 1) // GROUP_PAGE)
        return render(request, "group.html", uid=uid, keeper=keeper, members=members, group=group, page=p,
                      last=last, per=GROUP_PAGE)

    @app.get("/sql", response_class=HTMLResponse)
    def sql(request: Request, q: str = ""):
        from curate.explore_cli import _cell
        from curate.serve.data import SQL_MAX_ROWS, SQL_TIMEOUT
        from curate.sql_guard import run_select

        ctx: dict[str, Any] = {"q": q, "names": [], "rows": [], "more": False, "error": None}
        if q.strip():
            cur = ex.cursor()
            try:
                names, rows, more = run_select(cur, q, max_rows=SQL_MAX_ROWS, timeout=SQL_TIMEOUT)
                ctx.update(names=names, rows=[[_cell(v) for v in r] for r in rows], more=more)
            except SqlRefused as e:
                ctx["error"] = str(e)
            finally:
                cur.close()
        if ctx["error"] and "text/html" not in request.headers.get("accept", ""):
            return error(request, 400, ctx["error"])
        return render(request, "sql.html", 400 if ctx["error"] else 200, **ctx)

    @app.post("/subset", response_class=HTMLResponse)
    async def subset(request: Request):
        from curate.io.sql import sql_string

        form = await request.form(max_files=0, max_fields=2000, max_part_size=1 << 20)
        kind, name = str(form.get("kind") or "output"), str(form.get("name") or "")
        uids = [str(u) for u in form.getlist("uid")][:10_000]
        if uids:
            condition = "uid IN (" + ", ".join(sql_string(u[:1000]) for u in uids) + ")"
        else:
            flt = ex.filter(reason=str(form.get("reason") or ""), stage=str(form.get("stage") or ""),
                            metric=str(form.get("metric") or ""), lo=_float(form.get("lo")),
                            hi=_float(form.get("hi")), where=str(form.get("where") or ""))
            condition = flt.literal()
        res = ex.save_subset(name, kind, condition)
        return render(request, "message.html", title="Subset saved",
                      message=f"{res['rows']} rows -> {res['path']}", result=res)

    return app


def serve(output: str | Path, host: str = "127.0.0.1", port: int = 8765, subsets_dir: str | Path | None = None) -> None:
    """Run the app with uvicorn until interrupted; prints the URL first (port 0: any free port)."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise InputError(f"serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    sock.listen(2048)  # connections wait in the backlog from now on: the URL printed below answers at once
    hosts = [host, f"{host}:{port}"] + (["localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}"]
                                        if host in ("127.0.0.1", "localhost", "::1") else [])
    app = create_app(output, subsets_dir, allowed_hosts=None if host in ("0.0.0.0", "::") else hosts)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve: listening on %s: anyone who can reach this address can browse the output", host)
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"curate serve: http://{shown}:{port}/ (Ctrl-C to stop)\n")
    sys.stdout.flush()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
