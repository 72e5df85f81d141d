"""edgenas: hardware-aware neural architecture search for microcontrollers (metadata lives in setup.cfg)."""
import setuptools

setuptools.setup()
