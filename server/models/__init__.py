"""Models: safe loading of archives, what a model is (and the questions asked of it), the
built-in zoo and the registry. The bottom layer with torch: it imports only server/errors.py."""
