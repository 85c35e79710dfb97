"""Two read-only lists: stored DICOM series with their DICOMweb URLs, and the audit log."""

from __future__ import annotations

from aiohttp import web

from medagent.hub.dashboard.layout import (
    page_response,
)
from medagent.hub.dashboard.markup import Markup, instant, join, render
from medagent.hub.dashboard.state import state_of

__all__ = ["audit_page", "dicom_page"]

# -- DICOM ------------------------------------------------------------------------------

async def dicom_page(request: web.Request) -> web.StreamResponse:
    """Stored DICOM series, newest first, each with its DICOMweb (WADO-RS) URL."""
    state = state_of(request)
    series = await state.reader.run(state.reader.dicom_series)
    if series is None:
        return page_response(request, "DICOM", Markup('<p class="hint">This hub has no DICOM store.</p>'))
    base = f"{request.scheme}://{request.host}/dicomweb"
    rows = join(render(
        '<tr><td><code>{study}</code></td><td><code>{series}</code></td><td>{modality}</td><td>{date}</td>'
        '<td class="num">{count}</td><td class="num">{size}</td><td>{stored}</td>'
        '<td><a href="{url}">{url}</a></td></tr>',
        study=s.study_uid, series=s.series_uid, modality=s.modality or "—", date=s.study_date or "—",
        count=s.instances, size=f"{s.size / 2**20:.1f} MiB", stored=instant(s.last_stored * 1000),
        url=f"{base}/studies/{s.study_uid}/series/{s.series_uid}",
    ) for s in series)
    body = render(
        '<p class="hint">DICOMweb URLs answer QIDO-RS / WADO-RS clients that send the admin token or an agent'
        ' token as a bearer token.</p>'
        '<table class="dicom"><thead><tr><th>Study UID</th><th>Series UID</th><th>Modality</th><th>Study date</th>'
        '<th>Instances</th><th>Size</th><th>Last stored</th><th>DICOMweb (WADO-RS)</th></tr></thead>'
        '<tbody>{rows}</tbody></table>{empty}',
        rows=rows, empty=Markup('<p class="hint">No DICOM instance stored yet.</p>') if not series else Markup(""),
    )
    return page_response(request, "DICOM", body)


# -- audit --------------------------------------------------------------------------------

async def audit_page(request: web.Request) -> web.StreamResponse:
    entries = state_of(request).db.audit_entries(200)
    rows = join(render('<tr><td>{at}</td><td>{user}</td><td>{remote}</td><td>{action}</td><td>{target}</td>'
                       '<td>{outcome}</td></tr>', at=instant(e.at * 1000), user=e.user, remote=e.remote,
                       action=e.action, target=e.target, outcome=e.outcome) for e in entries)
    body = render('<table class="audit"><thead><tr><th>Time</th><th>User</th><th>From</th><th>Action</th>'
                  '<th>Target</th><th>Outcome</th></tr></thead><tbody>{rows}</tbody></table>', rows=rows)
    return page_response(request, "Audit log", body)
