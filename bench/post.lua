-- wrk script: POST a fixed body read from $BODY_FILE with $CONTENT_TYPE (and optional $HEADER_LENGTH
-- for Open Inference Protocol binary requests).
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "image/png"
local header_length = os.getenv("HEADER_LENGTH")
if header_length and header_length ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_length
end
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.body = f:read("*all")
f:close()
