"""``bitchat client``'s files: -file to a user and a group, the line a received file
prints, -getfile into a folder, and each failure's one line."""

from __future__ import annotations

from pathlib import Path

from im_helpers import im_server, port_of
from test_files import png


async def test_the_cli_sends_a_file_and_the_recipient_fetches_it(tmp_path: Path) -> None:
    from test_repl import repl_for

    async with im_server(tmp_path / "server") as server:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, h_out), repl_for(port, s) as (gris, g_out):
            await houyi.execute("-lo houyi 123456")
            await gris.execute("-lo gris 123456")
            source = tmp_path / "moon notes.txt"
            source.write_text("the far side\n")
            await houyi.execute(f"-file 2 {source}")
            line = h_out.lines[-1]
            assert line.startswith("Send file success (id "), line
            msg_id = line.split("(id ", 1)[1].split(")", 1)[0]
            assert line.endswith("): moon notes.txt, 13 bytes")
            shown = await g_out.expect("houyi(1): ")
            assert shown == f"houyi(1): [file] moon notes.txt (13 bytes): -getfile {msg_id}"
            folder = tmp_path / "downloads"
            await gris.execute(f"-getfile {msg_id} {folder}")
            assert g_out.lines[-1] == f"Get file success: {folder / 'moon notes.txt'}"
            assert (folder / "moon notes.txt").read_text() == "the far side\n"
            # An image to a group; its history line names the file too.
            await houyi.execute("-gcreate moon base")
            await gris.execute("-gjoin 1")
            (tmp_path / "p.png").write_bytes(png(20, 10))
            await houyi.execute(f"-file -g 1 {tmp_path / 'p.png'}")
            assert h_out.lines[-1].startswith("Send file success (id ")
            shown = await g_out.expect("[group 1] houyi(1): ")
            assert "[image] p.png (" in shown
            m = g_out.mark()
            await gris.execute("-hi -g 1")
            assert "[image] p.png (" in g_out.since(m)[-1]
            for line_in, answer in [
                ("-file 2", "Usage: -file userId path  or  -file -g groupId path"),
                ("-file -g 1", "Usage: -file userId path  or  -file -g groupId path"),
                ("-getfile", "Usage: -getfile msgId [folder]"),
                ("-getfile 12345", "Get file failed cause: no file message 12345 shown here"),
                (f"-file 2 {tmp_path / 'nope.txt'}", "Send file failed cause: "),
            ]:
                m = g_out.mark()
                await gris.execute(line_in)
                out = g_out.since(m)
                assert len(out) == 1 and out[0].startswith(answer), (line_in, out)
