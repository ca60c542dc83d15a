# Repository root on sys.path so tests import `blip` and `data` from the checkout.
