"""The reviewer web page: server-rendered HTML fragments and one small script (render.py)."""
