"""The command-line launchers (`python -m launch.<name>`); what they share is launch/common.py."""
import os

# TensorFlow (pulled in by clu and the TFLite converter) prints oneDNN and absl start-up notices on stderr at
# import; the launchers keep stderr for the one line that says what went wrong. oneDNN only affects TF's own CPU
# kernels, which no launcher's results go through (JAX computes; TFLite runs the int8 models).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
