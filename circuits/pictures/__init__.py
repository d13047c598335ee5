"""Pictures of circuits.

layout    what a picture shows: the edges, and where each node goes
drawing   static drawings (SVG, PNG, PDF) and curve plots, with matplotlib
viewer    the interactive page (one offline HTML file) and circuit-tracer graph files
"""
