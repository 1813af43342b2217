"""The P0 test plan: five checks run against a live server, and a record of the results.

python -m tools.p0 --url http://127.0.0.1:8000           # all five
python -m tools.p0 --only PR-ST01 PR-OBS01                # some
"""
