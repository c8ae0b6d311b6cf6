"""bmc — bone-marrow cell classification at the microscope.

The core package holds what every part of the kit shares and what the edge device needs without
TensorFlow: the preprocessing contract (:mod:`bmc.contract`) and the command-line front door
(:mod:`bmc.cli`). Training lives in :mod:`bmc.train` (the ``train/`` folder), conversion in
:mod:`bmc.convert`, the device application in :mod:`bmc.edge_app` and measurement in
:mod:`bmc.benchmarks`.
"""

__version__ = "0.1.0"
