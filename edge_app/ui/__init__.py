"""The technician's screen in a browser (``bmc edge ui``): :mod:`bmc.edge_app.ui.app` and its sign-in,
:mod:`bmc.edge_app.ui.auth`."""
