"""The screen's pages, one module each: the sessions and one session (:mod:`.sessions`), the review
grid (:mod:`.review`), one cell (:mod:`.cell`), the live session (:mod:`.live`), adaptation
(:mod:`.adapt`) and the device check (:mod:`.device`). Each page is a function of the application
and the request; :mod:`bmc.edge_app.ui.app` holds the route table."""
