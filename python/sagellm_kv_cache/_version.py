"""Version of the package; kept equal to project(VERSION) in CMakeLists.txt (checked by a test)."""

__version__ = "0.5.5.0"
