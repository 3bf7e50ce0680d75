"""Reproductions of failures found by trying fewstep as a new user and as an attacker would, each shown fixed."""
