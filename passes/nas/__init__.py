"""Neural architecture search on the user's own model: an elastic supernet of widths and depths (``lib``)."""
