"""Model side of the node: volumes in, label volumes out.

Nothing in this package knows about DIMSE, spools or jobs: it takes a SimpleITK image with its true geometry and
returns a label image on exactly that grid.
"""
