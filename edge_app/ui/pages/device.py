"""The device check: what ``bmc edge doctor`` says, on the screen."""

from __future__ import annotations

from bmc.edge_app.ui.web import Html, Request, Response, Screen, html


def device_page(app: Screen, req: Request) -> Response:
    from bmc.edge_app.service import doctor

    have, wrong = doctor(model_path=str(app.model) if app.model else None)
    body = html(
        "<ul>{have}{wrong}</ul>",
        have=Html.join(html("<li>{h}</li>", h=h) for h in have),
        wrong=Html.join(html("<li class='warn'>PROBLEM: {w}</li>", w=w) for w in wrong),
    )
    return app.page("Device", body, req)
