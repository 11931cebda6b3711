"""Samplers of the generators, each a pure function whose whole loop compiles to one program."""
