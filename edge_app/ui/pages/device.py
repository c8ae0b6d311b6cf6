"""The device check: what ``bmc edge doctor`` says, on the screen."""

from __future__ import annotations

from bmc.edge_app.ui.web import Html, Request, Response, Screen, html


def device_page(app: Screen, req: Request) -> Response:
    from bmc.edge_app.active import active_model
    from bmc.edge_app.service import disk_usage, doctor

    # the model new sessions count with: the one made active on the Adaptation page, else the configured
    active = active_model(app.storage)
    have, wrong = doctor(model_path=str(active or app.model) if (active or app.model) else None)
    if active is not None:
        have.insert(0, f"active model: {active.name} (made active on the Adaptation page; new sessions count with it)")
    pct, free = disk_usage(app.storage)
    have = [
        f"sessions stored in {app.storage}: its disk {pct:.0f}% used, {free:.0f} MB free",
        f"live sessions record from: {app.live.source}"
        if app.live is not None
        else "live sessions: no camera or source set up",
        *have,
    ]
    body = html(
        "<ul>{have}{wrong}</ul>",
        have=Html.join(html("<li>{h}</li>", h=h) for h in have),
        wrong=Html.join(html("<li class='warn'>PROBLEM: {w}</li>", w=w) for w in wrong),
    )
    return app.page("Device", body, req)
