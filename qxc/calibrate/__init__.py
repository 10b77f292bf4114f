"""Calibration: streaming observers over instrumented runs, and the Ranges they produce."""

from qxc.calibrate.collect import CalibrationMethod, TapRunner, collect_ranges
from qxc.calibrate.observers import Histogram, MinMax
from qxc.calibrate.ranges import Ranges

__all__ = ["CalibrationMethod", "Histogram", "MinMax", "Ranges", "TapRunner", "collect_ranges"]
