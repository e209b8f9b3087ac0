"""Scoring generated answers: batched A-OKVQA evaluation and the official metric."""
