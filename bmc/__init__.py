"""bmc — bone-marrow cell classification at the microscope.

The core package holds what every part of the kit shares and what the edge device needs without
TensorFlow: the preprocessing contract (:mod:`bmc.contract`) and the command-line front door
(:mod:`bmc.cli`). Training lives in :mod:`train`, conversion in :mod:`convert`, the device
application in :mod:`edge_app` and measurement in :mod:`benchmarks`.
"""

__version__ = "0.1.0"
