"""The ``bmc`` command line, one module per group of verbs (``data``, the model verbs, ``edge``,
``bench``) behind one front door. Verbs mirror the folders; heavy imports happen inside each verb
so that ``bmc edge`` on a device never imports TensorFlow."""

from __future__ import annotations

import click

from bmc.cli.common import MainGroup


@click.group(cls=MainGroup)
@click.version_option(package_name="bmc-edge")
def main() -> None:
    """bmc — bone-marrow cell classification at the microscope."""


def _register() -> None:
    from bmc.cli import bench, data, edge, models

    main.add_command(data.data)
    for cmd in (
        models.train_cmd,
        models.evaluate_cmd,
        models.convert_cmd,
        models.convert_onnx_cmd,
        models.prepare_adapt,
    ):
        main.add_command(cmd)
    main.add_command(edge.edge)
    main.add_command(bench.bench)


_register()
