"""The data layer: feature stores (``store``), raw manifests that live encoders read (``raw``), and
``fusionkit extract``, which turns the one into the other (``extract``)."""
