"""The technician's screen in a browser (``bmc edge ui``): :mod:`edge_app.ui.app` and its sign-in,
:mod:`edge_app.ui.auth`."""
