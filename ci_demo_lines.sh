# Lines for .ci/run (issue 29: `blip demo` and its browser test). Append them AFTER the README's test command:
# gradio 6.31 requires pillow<13, so installing the demo extra moves pillow 13.0.0 -> 12.3.0; run after the main
# suite, the suite keeps testing requirements.txt's pillow. Without chromium or gradio the browser tests skip (in
# the main suite above they do: nothing is installed yet); here they must run, so -rs shows any skip reason and
# a skipped browser test fails the step.
apt-get update -q
apt-get install -y -q chromium chromium-driver
.venv/bin/pip install -q --disable-pip-version-check -r requirements-demo.txt
.venv/bin/python -m pytest -q -rs -m browser tests/test_demo.py 2>&1 | tee /tmp/browser_tests.log
! grep -q "SKIPPED" /tmp/browser_tests.log
