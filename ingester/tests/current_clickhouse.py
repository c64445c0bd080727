"""Runs what the ingester would run on a current ClickHouse (PyPI's chdb: the
ClickHouse 26.x engine in process) and reports what happened, as JSON on
stdout. Called by ingester/tests/current_clickhouse.rs, which made the
inputs with the ingester's own code:

    python3 current_clickhouse.py INPUT.json

INPUT: {"ddl": [...], "structure": "name type, ...", "rows": "rows.bin",
        "presence": "SELECT ...", "marks_write": "INSERT ...",
        "marks_read": "SELECT ...", "queries": [...]}
"""

import json
import sys
import tempfile

from chdb import session


def main():
    spec = json.load(open(sys.argv[1]))
    report = {"version": None, "errors": [], "rows": [], "presence": [],
              "marks": None, "queries": []}
    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)

        def run(sql, fmt="JSONEachRow"):
            return str(s.query(sql, fmt))

        report["version"] = run("SELECT version()", "TabSeparated").strip()
        for statement in spec["ddl"]:
            try:
                run(statement)
            except Exception as error:  # noqa: BLE001 - reported, not hidden
                report["errors"].append(f"{statement[:60]}: {error}")
        structure = spec["structure"].replace("'", "\\'")
        try:
            run(f"INSERT INTO venus.events SELECT * FROM file('{spec['rows']}', "
                f"'RowBinary', '{structure}')")
        except Exception as error:  # noqa: BLE001
            report["errors"].append(f"insert: {error}")
        report["rows"] = [json.loads(line) for line in run(
            "SELECT *, toString(backend_id) AS backend_id_text, "
            "toUnixTimestamp64Milli(upload_time) AS upload_ms FROM venus.events "
            "ORDER BY kafka_offset").splitlines()]
        presence = spec["presence"].replace(" FORMAT JSONEachRow", "")
        report["presence"] = [json.loads(line) for line in run(presence).splitlines()]
        run(spec["marks_write"])
        report["marks"] = run(spec["marks_read"].replace(" FORMAT TabSeparated", ""),
                              "TabSeparated").strip()
        for query in spec["queries"]:
            try:
                run(query)
                report["queries"].append({"query": query, "ok": True})
            except Exception as error:  # noqa: BLE001
                report["queries"].append({"query": query, "ok": False,
                                          "error": str(error)[:300]})
    print(json.dumps(report))


main()
