-- trireme.lua: a Wireshark/tshark dissector for the trireme datagram protocol (version 1).
--
-- Usage:
--   tshark -X lua_script:tools/trireme.lua -r trace.pcap -V
--   tshark -X lua_script:tools/trireme.lua -r trace.pcap -Y trireme \
--          -T fields -e trireme.kind -e trireme.request_id -e trireme.message -e trireme.key
--   wireshark -X lua_script:tools/trireme.lua    (or copy the file into ~/.local/lib/wireshark/plugins/)
--
-- Checking that a trace decodes cleanly (prints nothing and exits 0 when every UDP datagram is
-- a well-formed trireme datagram; exits non-zero if this script fails to load):
--   tshark -n -o udp.try_heuristic_first:TRUE -X lua_script:tools/trireme.lua -r trace.pcap \
--     -Y 'udp && !(trireme && !trireme.malformed && !trireme.dissector_error && !_ws.malformed && !_ws.lua.error)'
--
-- In the Info column fragments are numbered from 1 ("frag 1/150", "frags 1-5,8" in an Ack);
-- the fields (trireme.frag_index, trireme.ack.range_start/end) keep the 0-based wire values.
--
-- Our programs use whatever UDP ports they bind (tests use ephemeral ones), so the dissector
-- is a heuristic one on UDP: it claims every datagram that starts with the magic "TRIR"
-- followed by protocol version 1 and a known kind. It is also offered in "Decode As..." for
-- udp.port (no fixed port is registered). If another dissector owns one of the ports (the
-- UDP dissector tries port tables before heuristics), add `-o udp.try_heuristic_first:TRUE`.
--
-- What it shows (the layout is src/wire/codec.rs, the bodies src/wire/message.rs):
--   * the frozen 60-byte big-endian header: magic, version, kind, flags (MAC, ack-of-response),
--     incarnation, request id, transmission, echo, fragment index/count, message length, MAC;
--   * an Ack's body: flags (complete, unknown), range count and the [start, end) ranges;
--   * for fragment 0 of a Request/Response: the message variant (`trireme.message`) and as
--     many body fields as fragment 0 holds. Bodies are bincode 2 (standard config: little
--     endian, variable-length integers: < 251 one byte, 251/252/253/254 + u16/u32/u64/u128 LE;
--     enum variants as a varint u32 index; strings and sequences as a varint u64 length;
--     bool/u8 one byte; Option one byte 0/1; SocketAddr as variant V4(0)/V6(1) + raw
--     octets + varint port). Later fragments are shown as raw payload (no reassembly).
--
-- The dissector never raises a Lua error on bad input: every read is bounds checked; bad
-- datagrams get the expert info `trireme.malformed`, a body cut by the end of fragment 0 of
-- a multi-fragment message the note `trireme.continued`.
--
-- Written against the Wireshark 4.0 Lua API (Debian bookworm's tshark).

local trireme = Proto("trireme", "Trireme Protocol")

local FIXED_HEADER_LEN = 60
-- With the MAC flag (a cluster key) the 8-byte stamp follows the fixed header: the header of
-- the datagram being dissected is then 68 bytes. Set at the start of every dissection.
local HEADER_LEN = FIXED_HEADER_LEN
local VERSION = 1
local MAX_MESSAGE = 8 * 1024 * 1024
local MIN_FRAGMENT_PAYLOAD = 256
local MAX_ACK_RANGES = 128

-- Bit test without the bit32 library (so the file also loads on a Lua 5.1 or 5.3+ Wireshark).
local function has_bit(value, bit) return math.floor(value / bit) % 2 == 1 end

local KIND_NAMES = { [1] = "Request", [2] = "Response", [3] = "Ack", [4] = "Probe", [5] = "Retry" }

-- Variant order of `enum Request` / `enum Response` in src/wire/message.rs (= bincode variant index).
local REQUEST_NAMES = {
    [0] = "Heartbeat", "QueryServers", "LockGet", "LockRelease", "LockWithdraw", "Print",
    "Set", "Get", "QueryAllKeys", "Prepare", "Commit", "Abort", "QueryTx", "Transfer", "GetR",
    "Raft", "GroupHello", "Forwarded", "ViewPush",
}
local RESPONSE_NAMES = {
    [0] = "HeartbeatAck", "HeartbeatRefused", "Servers", "LockGranted", "LockWaiting",
    "LockReleased", "Done", "Value", "Keys", "Error", "Prepared", "TxState", "Found",
    "GroupWelcome",
}
local ERROR_KINDS = {
    [0] = "not_found", "aborted", "rebalancing", "no_servers", "timeout", "unreachable",
    "bad_input", "not_holder", "deadlock",
}
local TX_OUTCOMES = { [0] = "Prepared", "Committed", "Aborted", "Unknown" }

----------------------------------------------------------------------------------------------
-- Fields

local F = {
    magic        = ProtoField.string("trireme.magic", "Magic"),
    version      = ProtoField.uint8("trireme.version", "Protocol version", base.DEC),
    kind         = ProtoField.uint8("trireme.kind", "Kind", base.DEC, KIND_NAMES),
    flags        = ProtoField.uint16("trireme.flags", "Flags", base.HEX),
    flag_mac     = ProtoField.bool("trireme.flags.mac", "MAC present", 16, nil, 0x0001),
    flag_ackresp = ProtoField.bool("trireme.flags.ack_response", "Acknowledges a response", 16, nil, 0x0002),
    flag_padded  = ProtoField.bool("trireme.flags.padded", "Padded (first contact)", 16, nil, 0x0004),
    flag_other   = ProtoField.uint16("trireme.flags.reserved", "Reserved bits", base.HEX, nil, 0xfff8),
    incarnation  = ProtoField.uint64("trireme.incarnation", "Incarnation", base.HEX),
    request_id   = ProtoField.uint64("trireme.request_id", "Request id", base.DEC),
    transmission = ProtoField.uint32("trireme.transmission", "Transmission", base.DEC),
    echo         = ProtoField.uint32("trireme.echo", "Echo", base.DEC),
    frag_index   = ProtoField.uint32("trireme.frag_index", "Fragment index", base.DEC),
    frag_count   = ProtoField.uint32("trireme.frag_count", "Fragment count", base.DEC),
    message_len  = ProtoField.uint32("trireme.message_len", "Message length", base.DEC),
    mac          = ProtoField.bytes("trireme.mac", "MAC"),
    stamp        = ProtoField.uint64("trireme.stamp", "Stamp (µs since the Unix epoch)"),
    token        = ProtoField.bytes("trireme.token", "Address-validation token"),
    payload      = ProtoField.bytes("trireme.payload", "Fragment payload"),

    -- Ack body
    ack_flags       = ProtoField.uint8("trireme.ack.flags", "Ack flags", base.HEX),
    ack_complete    = ProtoField.bool("trireme.ack.complete", "Complete", 8, nil, 0x01),
    ack_unknown     = ProtoField.bool("trireme.ack.unknown", "Unknown request", 8, nil, 0x02),
    ack_range_count = ProtoField.uint16("trireme.ack.range_count", "Range count", base.DEC),
    ack_range       = ProtoField.string("trireme.ack.range", "Range"),
    ack_range_start = ProtoField.uint32("trireme.ack.range_start", "Range start", base.DEC),
    ack_range_end   = ProtoField.uint32("trireme.ack.range_end", "Range end (exclusive)", base.DEC),

    -- Message body (fragment 0 of a Request or Response)
    message       = ProtoField.string("trireme.message", "Message"),
    variant       = ProtoField.uint32("trireme.variant", "Variant index", base.DEC),
    key           = ProtoField.string("trireme.key", "Key"),
    value         = ProtoField.string("trireme.value", "Value"),
    value_len     = ProtoField.uint32("trireme.value_len", "Value length", base.DEC),
    value_version = ProtoField.uint64("trireme.value_version", "Value version", base.DEC),
    epoch         = ProtoField.uint64("trireme.epoch", "Epoch", base.DEC),
    txid          = ProtoField.string("trireme.txid", "Transaction id"),
    server_id     = ProtoField.string("trireme.server_id", "Server id"),
    addr          = ProtoField.string("trireme.addr", "Address"),
    timeout_ms    = ProtoField.uint32("trireme.timeout_ms", "Timeout (ms)", base.DEC),
    lock          = ProtoField.string("trireme.lock", "Lock"),
    requester     = ProtoField.string("trireme.requester", "Requester"),
    claim         = ProtoField.uint64("trireme.claim", "Claim", base.DEC),
    holder        = ProtoField.string("trireme.holder", "Holder"),
    position      = ProtoField.uint32("trireme.position", "Queue position", base.DEC),
    text          = ProtoField.string("trireme.text", "Text"),
    close         = ProtoField.bool("trireme.close", "Close"),
    rebalancing   = ProtoField.bool("trireme.rebalancing", "Rebalancing"),
    replicas      = ProtoField.uint32("trireme.replicas", "Replicas", base.DEC),
    vnodes        = ProtoField.uint32("trireme.vnodes", "Vnodes", base.DEC),
    finished      = ProtoField.uint64("trireme.finished", "Finished epoch", base.DEC),
    sent          = ProtoField.uint64("trireme.sent", "Sent epoch", base.DEC),
    delivered     = ProtoField.uint64("trireme.delivered", "Delivered epoch", base.DEC),
    count         = ProtoField.uint32("trireme.count", "Count", base.DEC),
    error_kind    = ProtoField.string("trireme.error_kind", "Error kind"),
    error_message = ProtoField.string("trireme.error_message", "Error message"),
    cycle         = ProtoField.string("trireme.cycle", "Cycle element"),
    tx_state      = ProtoField.string("trireme.tx_state", "Transaction state"),
    present       = ProtoField.bool("trireme.version_present", "Version present"),

    -- The view-leader group (Raft, GroupHello/GroupWelcome, Forwarded; leader hints)
    leader        = ProtoField.string("trireme.leader", "Group leader"),
    group_member  = ProtoField.string("trireme.group_member", "Group member"),
    raft_len      = ProtoField.uint32("trireme.raft_len", "Raft message length", base.DEC),
    member_index  = ProtoField.uint32("trireme.member_index", "Member (place in --peers)", base.DEC),
    member_incarnation = ProtoField.uint64("trireme.member_incarnation", "Member incarnation", base.HEX),
    origin        = ProtoField.string("trireme.origin", "Origin"),
    inner_len     = ProtoField.uint32("trireme.inner_len", "Forwarded request length", base.DEC),
    inner_message = ProtoField.string("trireme.inner_message", "Forwarded request"),
    fresh         = ProtoField.bool("trireme.fresh", "Fresh (no Raft state)"),
    knows_you     = ProtoField.bool("trireme.knows_you", "Knows the asker at this incarnation"),
}

local FIELD_ORDER = {
    "magic", "version", "kind", "flags", "flag_mac", "flag_ackresp", "flag_padded", "flag_other",
    "incarnation",
    "request_id", "transmission", "echo", "frag_index", "frag_count", "message_len", "mac", "stamp",
    "token", "payload",
    "ack_flags", "ack_complete", "ack_unknown", "ack_range_count", "ack_range", "ack_range_start",
    "ack_range_end", "message", "variant", "key", "value", "value_len", "value_version", "epoch",
    "txid", "server_id", "addr", "timeout_ms", "lock", "requester", "claim", "holder", "position", "text",
    "close", "rebalancing", "replicas", "vnodes", "finished", "sent", "delivered", "count",
    "error_kind", "error_message", "cycle", "tx_state", "present",
    "leader", "group_member", "raft_len", "member_index", "member_incarnation", "origin",
    "inner_len", "inner_message", "fresh", "knows_you",
}
local field_list = {}
for _, name in ipairs(FIELD_ORDER) do field_list[#field_list + 1] = assert(F[name], name) end
for name in pairs(F) do
    local listed = false
    for _, n in ipairs(FIELD_ORDER) do if n == name then listed = true end end
    assert(listed, "field not in FIELD_ORDER: " .. name)
end
trireme.fields = field_list

local E_MALFORMED = ProtoExpert.new("trireme.malformed", "Malformed trireme datagram",
    expert.group.MALFORMED, expert.severity.ERROR)
local E_CONTINUED = ProtoExpert.new("trireme.continued", "Message body continues in later fragments",
    expert.group.REASSEMBLE, expert.severity.NOTE)
local E_INTERNAL = ProtoExpert.new("trireme.dissector_error", "Trireme dissector error",
    expert.group.UNDECODED, expert.severity.WARN)
trireme.experts = { E_MALFORMED, E_CONTINUED, E_INTERNAL }

----------------------------------------------------------------------------------------------
-- A bounds-checked bincode reader. `pos` and `limit` are offsets in the tvb; `msg_end` is where
-- the whole message body would end (it may lie beyond the datagram for a fragmented message).
-- Running past `limit` raises SHORT; a structural error raises {bad = text}; both are caught.

local SHORT = {}
local function short() error(SHORT, 0) end
local function bad(text) error({ bad = text }, 0) end

local VARINT_LEN = { [251] = 2, [252] = 4, [253] = 8, [254] = 16 }

local Reader = {}
Reader.__index = Reader

local function new_reader(tvb, pos, limit, msg_end)
    return setmetatable({ tvb = tvb, pos = pos, limit = limit, msg_end = msg_end }, Reader)
end

function Reader:need(n)
    if self.pos + n > self.limit then short() end
end

function Reader:range_from(start)
    local len = self.pos - start
    if len <= 0 then return nil end
    return self.tvb(start, len)
end

-- One raw byte: value, range.
function Reader:byte()
    self:need(1)
    local rg = self.tvb(self.pos, 1)
    self.pos = self.pos + 1
    return rg:uint(), rg
end

-- One varint: its little-endian value bytes as a Lua string, and the range it occupies.
function Reader:varint()
    local start = self.pos
    local tag = self:byte()
    if tag < 251 then return string.char(tag), self.tvb(start, 1) end
    local n = VARINT_LEN[tag]
    if not n then bad("invalid varint tag " .. tag) end
    self:need(n)
    local raw = self.tvb:raw(self.pos, n)
    self.pos = self.pos + n
    return raw, self.tvb(start, 1 + n)
end

local function le_number(raw, max_bytes, what)
    if #raw > max_bytes then bad(what .. ": integer too wide") end
    local v = 0
    for i = #raw, 1, -1 do v = v * 256 + raw:byte(i) end
    return v
end

local function le_uint64(raw, what)
    if #raw > 8 then bad(what .. ": integer too wide for u64") end
    local p = raw .. string.rep("\0", 8 - #raw)
    local lo = p:byte(1) + p:byte(2) * 0x100 + p:byte(3) * 0x10000 + p:byte(4) * 0x1000000
    local hi = p:byte(5) + p:byte(6) * 0x100 + p:byte(7) * 0x10000 + p:byte(8) * 0x1000000
    return UInt64.new(lo, hi)
end

local function le_hex128(raw)
    local p = raw .. string.rep("\0", 16 - #raw)
    local out = {}
    for i = 16, 1, -1 do out[#out + 1] = string.format("%02x", p:byte(i)) end
    return table.concat(out)
end

function Reader:u32(tree, field, what)
    local raw, rg = self:varint()
    local v = le_number(raw, 4, what or "u32")
    if tree and field then tree:add(field, rg, v) end
    return v
end

function Reader:u64(tree, field, what)
    local raw, rg = self:varint()
    local v = le_uint64(raw, what or "u64")
    if tree and field then tree:add(field, rg, v) end
    return v
end

-- A u128 (ServerId, TxId), shown as 32 lowercase hex digits like the programs print it.
function Reader:u128(tree, field)
    local raw, rg = self:varint()
    local hex = le_hex128(raw)
    if tree and field then tree:add(field, rg, hex) end
    return hex
end

function Reader:bool(tree, field)
    local b, rg = self:byte()
    if b > 1 then bad("invalid bool " .. b) end
    if tree and field then tree:add(field, rg, b == 1) end
    return b == 1
end

-- A sequence or string length, checked against what is left of the whole message.
function Reader:len(what, unit)
    local raw, rg = self:varint()
    local n = le_number(raw, 8, what)
    if n * (unit or 1) > self.msg_end - self.pos then
        bad(string.format("%s: length %.0f exceeds the message", what, n))
    end
    return n, rg
end

-- A string. opts.len_field: also add its length; opts.label: name used in notes.
function Reader:str(tree, field, opts)
    opts = opts or {}
    local label = opts.label or "string"
    local n, lrg = self:len(label)
    if opts.len_field then tree:add(opts.len_field, lrg, n) end
    if self.pos + n > self.limit then
        local avail = self.limit - self.pos
        local rg = avail > 0 and self.tvb(self.pos, avail) or lrg
        tree:add(rg, string.format("%s: %d bytes, %d in this datagram (continues beyond it)",
            (label:gsub("^%l", string.upper)), n, avail))
        self.pos = self.limit
        short()
    end
    local s
    if n == 0 then
        s = ""
        tree:add(field, lrg, s)
    else
        local rg = self.tvb(self.pos, n)
        s = rg:string(ENC_UTF_8)
        tree:add(field, rg, s)
        self.pos = self.pos + n
    end
    return s
end

local function ipv6_text(raw)
    local groups = {}
    for i = 1, 16, 2 do groups[#groups + 1] = string.format("%x", raw:byte(i) * 256 + raw:byte(i + 1)) end
    return table.concat(groups, ":")
end

-- A std::net::SocketAddr: variant V4 (0) or V6 (1), then the octets and a varint port.
function Reader:sockaddr(tree, field)
    local start = self.pos
    local tag = self:u32(nil, nil, "address family")
    local text, port
    if tag == 0 then
        self:need(4)
        local raw = self.tvb:raw(self.pos, 4)
        self.pos = self.pos + 4
        port = self:u32(nil, nil, "port")
        text = string.format("%d.%d.%d.%d:%d", raw:byte(1), raw:byte(2), raw:byte(3), raw:byte(4), port)
    elseif tag == 1 then
        self:need(16)
        local raw = self.tvb:raw(self.pos, 16)
        self.pos = self.pos + 16
        port = self:u32(nil, nil, "port")
        text = string.format("[%s]:%d", ipv6_text(raw), port)
    else
        bad("invalid SocketAddr variant " .. tag)
    end
    if port and port > 65535 then bad("port out of range") end
    tree:add(field, self:range_from(start), text)
    return text
end

-- A sequence: its length (field trireme.count), then `each(reader, subtree, i)` per element.
function Reader:seq(tree, label, each, min_elem_size)
    local start = self.pos
    local n, lrg = self:len(label, min_elem_size or 1)
    local sub = tree:add(lrg, string.format("%s (%d)", label, n))
    sub:add(F.count, lrg, n)
    for i = 1, n do each(self, sub, i) end
    local rg = self:range_from(start)
    if rg then sub:set_len(rg:len()) end
    return n
end

-- A server id under a labelled subtree ("Expected", "Primary").
local function labelled_id(r, tree, label)
    local start = r.pos
    r:need(1)
    local sub = tree:add(r.tvb(start, 1), label)
    local id = r:u128(sub, F.server_id)
    sub:set_len(r.pos - start)
    sub:append_text(": " .. id)
end

local function member(r, tree, i)
    local start = r.pos
    r:need(1)
    local sub = tree:add(r.tvb(start, 1), "Member " .. i)
    local id = r:u128(sub, F.server_id)
    local addr = r:sockaddr(sub, F.addr)
    sub:set_len(r.pos - start)
    sub:append_text(": " .. id .. " " .. addr)
end

local function view(r, tree, label)
    local start = r.pos
    r:need(1)
    local sub = tree:add(r.tvb(start, 1), label)
    local epoch = r:u64(sub, F.epoch)
    r:seq(sub, "Members", member, 2)
    r:u32(sub, F.replicas)
    r:u32(sub, F.vnodes)
    sub:set_len(r.pos - start)
    sub:append_text(": epoch " .. tostring(epoch))
    return epoch
end

local function lock_pair(r, tree, info)
    info.lock = r:str(tree, F.lock, { label = "lock" })
    info.requester = r:str(tree, F.requester, { label = "requester" })
end

-- A lock request with its claim (LockGet, LockWithdraw).
local function lock_claim(r, tree, info)
    lock_pair(r, tree, info)
    r:u64(tree, F.claim)
end

-- A release: the lock pair and an Option<u64> claim (None: whatever the requester holds).
local function lock_release(r, tree, info)
    lock_pair(r, tree, info)
    local some, rg = r:byte()
    if some > 1 then bad("invalid Option tag " .. some) end
    if some == 1 then
        r:u64(tree, F.claim)
    else
        tree:add(rg, "Claim: any (whatever the requester holds)")
    end
end

-- An Option<SocketAddr> naming the view-leader group's leader (None: the member that answered).
local function leader_hint(r, tree, info)
    local some, rg = r:byte()
    if some > 1 then bad("invalid Option tag " .. some) end
    if some == 1 then
        info.leader = r:sockaddr(tree, F.leader)
    else
        tree:add(rg, "Group leader: none (the member that answered leads, a group of one)")
    end
end

-- A Vec<u8> shown by its length (field `field`); skips the bytes this datagram holds and
-- returns the length and the offset where the bytes start.
function Reader:blob(tree, field, label)
    local n, lrg = self:len(label)
    tree:add(field, lrg, n)
    local start = self.pos
    if self.pos + n > self.limit then
        self.pos = self.limit
        short()
    end
    self.pos = self.pos + n
    return n, start
end

-- Body decoders by variant name. Each reads the variant's fields in declaration order and may
-- put a few values into `info` for the Info column.
local REQUEST_BODY = {
    Heartbeat = function(r, t, info)
        info.id = r:u128(t, F.server_id)
        info.addr = r:sockaddr(t, F.addr)
        r:u64(t, F.finished)
        r:u64(t, F.sent)
        info.epoch = r:u64(t, F.epoch)
    end,
    QueryServers = function() end,
    LockGet = lock_claim,
    LockRelease = lock_release,
    LockWithdraw = lock_claim,
    Print = function(r, t) r:str(t, F.text, { label = "text" }) end,
    Set = function(r, t, info)
        info.key = r:str(t, F.key, { label = "key" })
        r:str(t, F.value, { label = "value", len_field = F.value_len })
    end,
    Get = function(r, t, info) info.key = r:str(t, F.key, { label = "key" }) end,
    QueryAllKeys = function() end,
    Prepare = function(r, t, info)
        info.txid = r:u128(t, F.txid)
        info.key = r:str(t, F.key, { label = "key" })
        r:str(t, F.value, { label = "value", len_field = F.value_len })
        info.epoch = r:u64(t, F.epoch)
        labelled_id(r, t, "Expected")
        r:seq(t, "Participants", member, 2)
        r:u32(t, F.timeout_ms)
    end,
    Commit = function(r, t, info)
        info.txid = r:u128(t, F.txid)
        info.version = r:u64(t, F.value_version)
    end,
    Abort = function(r, t, info) info.txid = r:u128(t, F.txid) end,
    QueryTx = function(r, t, info)
        info.txid = r:u128(t, F.txid)
        info.key = r:str(t, F.key, { label = "key" })
        labelled_id(r, t, "Expected")
        labelled_id(r, t, "Primary")
        r:bool(t, F.close)
    end,
    Transfer = function(r, t, info)
        info.epoch = r:u64(t, F.epoch)
        info.count = r:seq(t, "Entries", function(rr, sub, i)
            local start = rr.pos
            rr:need(1)
            local es = sub:add(rr.tvb(start, 1), "Entry " .. i)
            local key = rr:str(es, F.key, { label = "key" })
            rr:str(es, F.value, { label = "value", len_field = F.value_len })
            rr:u64(es, F.value_version)
            -- The transaction that wrote it (an Option: absent for a raw set).
            if rr:bool(es, F.present) then rr:u128(es, F.txid) end
            es:set_len(rr.pos - start)
            es:append_text(": " .. key)
        end, 3)
    end,
    GetR = function(r, t, info)
        info.key = r:str(t, F.key, { label = "key" })
        info.epoch = r:u64(t, F.epoch)
    end,
    -- One raft-rs message (protobuf), shown by its length.
    Raft = function(r, t, info) info.count = r:blob(t, F.raft_len, "raft message") end,
    GroupHello = function(r, t, info)
        info.member = r:u32(t, F.member_index, "member")
        r:u64(t, F.member_incarnation, "incarnation")
    end,
    -- The origin, then the encoded inner request (its variant named when the byte is here).
    Forwarded = function(r, t, info)
        info.addr = r:sockaddr(t, F.origin)
        local n, start = r:blob(t, F.inner_len, "forwarded request")
        if n > 0 then
            local idx = r.tvb(start, 1):uint()
            local inner = idx < 251 and REQUEST_NAMES[idx] or nil
            if inner then
                t:add(F.inner_message, r.tvb(start, 1), inner)
                info.inner = inner
            end
        end
    end,
    -- The view leader's push of a new view: HeartbeatAck's fields without the leader hint.
    ViewPush = function(r, t, info)
        info.epoch = view(r, t, "View")
        view(r, t, "Completed view")
        r:u64(t, F.delivered)
        r:seq(t, "Recent views", function(rr, sub) view(rr, sub, "View") end, 4)
    end,
}

local RESPONSE_BODY = {
    HeartbeatAck = function(r, t, info)
        info.epoch = view(r, t, "View")
        view(r, t, "Completed view")
        r:u64(t, F.delivered)
        leader_hint(r, t, info)
        r:seq(t, "Recent views", function(rr, sub) view(rr, sub, "View") end, 4)
    end,
    HeartbeatRefused = function(r, t, info) info.epoch = view(r, t, "View") end,
    Servers = function(r, t, info)
        info.epoch = view(r, t, "View")
        r:bool(t, F.rebalancing)
        r:seq(t, "Pending", function(rr, sub) rr:u128(sub, F.server_id) end, 1)
        leader_hint(r, t, info)
        r:seq(t, "Group", function(rr, sub) rr:sockaddr(sub, F.group_member) end, 2)
    end,
    LockGranted = function() end,
    LockWaiting = function(r, t, info)
        info.holder = r:str(t, F.holder, { label = "holder" })
        r:u32(t, F.position)
    end,
    LockReleased = function() end,
    Done = function() end,
    Value = function(r, t) r:str(t, F.value, { label = "value", len_field = F.value_len }) end,
    Keys = function(r, t, info)
        info.count = r:seq(t, "Keys", function(rr, sub) rr:str(sub, F.key, { label = "key" }) end, 1)
    end,
    Error = function(r, t, info)
        local start = r.pos
        local idx = r:u32(nil, nil, "error kind")
        local kind = ERROR_KINDS[idx]
        if not kind then bad("unknown error kind " .. idx) end
        t:add(F.error_kind, r:range_from(start), kind)
        info.error = kind
        r:str(t, F.error_message, { label = "error message" })
        r:seq(t, "Cycle", function(rr, sub) rr:str(sub, F.cycle, { label = "cycle" }) end, 1)
    end,
    Prepared = function(r, t, info)
        local some = r:bool(t, F.present)
        if some then info.version = r:u64(t, F.value_version) end
    end,
    TxState = function(r, t, info)
        local start = r.pos
        local idx = r:u32(nil, nil, "transaction state")
        local state = TX_OUTCOMES[idx]
        if not state then bad("unknown transaction state " .. idx) end
        t:add(F.tx_state, r:range_from(start), state)
        info.state = state
        if idx == 1 then info.version = r:u64(t, F.value_version) end
    end,
    Found = function(r, t, info)
        r:str(t, F.value, { label = "value", len_field = F.value_len })
        info.version = r:u64(t, F.value_version)
    end,
    GroupWelcome = function(r, t)
        r:bool(t, F.fresh)
        r:bool(t, F.knows_you)
    end,
}

----------------------------------------------------------------------------------------------
-- The dissector


-- The "malformed" notes of the datagram being dissected (appended to the Info column).
local notes = {}

local function malformed(item, text)
    item:add_proto_expert_info(E_MALFORMED, "Malformed trireme datagram: " .. text)
    notes[#notes + 1] = text
end

-- The most fragments a message of `len` bytes may have (codec::fragment_count at 256 bytes).
local function max_fragments(len)
    local n = math.ceil(len / MIN_FRAGMENT_PAYLOAD)
    if n < 1 then n = 1 end
    return n
end

-- The payload length of fragment `index` (codec::fragment_range).
local function fragment_len(message_len, count, index)
    if count < 1 then count = 1 end
    local size = math.ceil(message_len / count)
    local start = math.min(index * size, message_len)
    local stop = math.min(start + size, message_len)
    return stop - start
end

local function quote(s)
    if #s > 40 then s = s:sub(1, 40) .. "..." end
    local q = string.format("%q", s):gsub("\\\n", "\\n")
    return q
end

local function info_details(info)
    local parts = {}
    if info.key then parts[#parts + 1] = "key=" .. quote(info.key) end
    if info.lock then parts[#parts + 1] = "lock=" .. quote(info.lock) end
    if info.requester then parts[#parts + 1] = "requester=" .. quote(info.requester) end
    if info.holder then parts[#parts + 1] = "holder=" .. quote(info.holder) end
    if info.epoch then parts[#parts + 1] = "epoch=" .. tostring(info.epoch) end
    if info.version then parts[#parts + 1] = "version=" .. tostring(info.version) end
    if info.state then parts[#parts + 1] = "state=" .. info.state end
    if info.error then parts[#parts + 1] = "error=" .. info.error end
    if info.count then parts[#parts + 1] = "n=" .. info.count end
    if info.addr then parts[#parts + 1] = "addr=" .. info.addr end
    if info.leader then parts[#parts + 1] = "leader=" .. info.leader end
    if info.member then parts[#parts + 1] = "member=" .. info.member end
    if info.inner then parts[#parts + 1] = "inner=" .. info.inner end
    if #parts == 0 then return "" end
    return " " .. table.concat(parts, " ")
end

-- Decodes as much of the message body as fragment 0 holds. Returns the variant name (or nil)
-- and a table of values for the Info column.
local function dissect_body(tvb, tree, kind, hdr, payload_len, cut)
    local is_request = kind == 1
    local names = is_request and REQUEST_NAMES or RESPONSE_NAMES
    local bodies = is_request and REQUEST_BODY or RESPONSE_BODY
    local msg_end = HEADER_LEN + hdr.message_len
    local limit = math.min(tvb:len(), msg_end)
    local r = new_reader(tvb, HEADER_LEN, limit, msg_end)
    local info = {}
    local name
    local body_tree

    local ok, err = pcall(function()
        local start = r.pos
        local idx = r:u32(nil, nil, "variant")
        local vrange = r:range_from(start)
        name = names[idx]
        if not name then
            bad(string.format("unknown %s variant %d", is_request and "request" or "response", idx))
        end
        tree:add(F.message, vrange, name)
        body_tree = tree:add(tvb(HEADER_LEN, math.min(payload_len, tvb:len() - HEADER_LEN)),
            (is_request and "Request body: " or "Response body: ") .. name)
        body_tree:add(F.variant, vrange, idx)
        bodies[name](r, body_tree, info)
        if r.pos ~= msg_end then
            bad(string.format("%d trailing bytes after the body", msg_end - r.pos))
        end
    end)
    if not ok then
        local where = body_tree or tree
        if err == SHORT then
            if cut then
                where:add(tvb(tvb:len() - 1, 1), "[Body cut short by the capture length]")
            elseif hdr.frag_count > 1 then
                where:add_proto_expert_info(E_CONTINUED)
            else
                malformed(where, "body truncated")
            end
        elseif type(err) == "table" and err.bad then
            malformed(where, err.bad)
        else
            where:add_proto_expert_info(E_INTERNAL, "Trireme dissector error: " .. tostring(err))
        end
    end
    return name, info
end

-- Decodes an Ack body (codec::AckBody). Returns a summary for the Info column.
local function dissect_ack(tvb, tree)
    local len = tvb:len() - HEADER_LEN
    if len < 3 then
        malformed(tree, "ack body truncated")
        return ""
    end
    local sub = tree:add(tvb(HEADER_LEN, len), "Ack body")
    local flags_rg = tvb(HEADER_LEN, 1)
    local flags = flags_rg:uint()
    local ft = sub:add(F.ack_flags, flags_rg)
    ft:add(F.ack_complete, flags_rg)
    ft:add(F.ack_unknown, flags_rg)
    if flags >= 4 then
        malformed(ft, string.format("unknown ack flags 0x%02x", flags))
    end
    local n_rg = tvb(HEADER_LEN + 1, 2)
    local n = n_rg:uint()
    local nt = sub:add(F.ack_range_count, n_rg)
    if n > MAX_ACK_RANGES then
        malformed(nt, n .. " ack ranges")
        return ""
    end
    local pos = HEADER_LEN + 3
    local previous_end = 0
    local texts = {}
    local complete_list = true
    for _ = 1, n do
        if pos + 8 > tvb:len() then
            malformed(sub, "ack body truncated")
            complete_list = false
            break
        end
        local s, e = tvb(pos, 4):uint(), tvb(pos + 4, 4):uint()
        local text = string.format("[%d, %d)", s, e)
        local rt = sub:add(F.ack_range, tvb(pos, 8), text)
        rt:add(F.ack_range_start, tvb(pos, 4))
        rt:add(F.ack_range_end, tvb(pos + 4, 4))
        if s >= e or s < previous_end then malformed(rt, "bad ack range " .. text) end
        previous_end = e
        -- The Info column numbers fragments from 1 (like "frag 1/150"); the fields keep wire values.
        texts[#texts + 1] = (e - s == 1) and tostring(s + 1) or string.format("%d-%d", s + 1, e)
        pos = pos + 8
    end
    if complete_list and pos < tvb:len() then
        malformed(sub, "trailing bytes after ack")
    end
    local summary = {}
    if has_bit(flags, 1) then summary[#summary + 1] = "complete" end
    if has_bit(flags, 2) then summary[#summary + 1] = "unknown" end
    if #texts > 0 then
        local shown = texts
        if #texts > 6 then shown = { texts[1], texts[2], texts[3], "...", texts[#texts] } end
        summary[#summary + 1] = "frags " .. table.concat(shown, ",")
    end
    sub:append_text(": " .. (#summary > 0 and table.concat(summary, " ") or "no ranges"))
    return #summary > 0 and (" " .. table.concat(summary, " ")) or ""
end

-- Dissects one datagram; returns the Info column text.
local function dissect(tvb, pinfo, root)
    local len = tvb:len()
    local reported = tvb:reported_len()
    local cut = len < reported -- the capture kept only part of the datagram (snaplen)
    local tree = root:add(trireme, tvb())

    if len < 4 or tvb(0, 4):raw() ~= "TRIR" then
        malformed(tree, "bad magic")
        return "Not trireme"
    end
    tree:add(F.magic, tvb(0, 4), "TRIR")
    HEADER_LEN = FIXED_HEADER_LEN
    if len >= 8 and has_bit(tvb(6, 2):uint(), 0x0001) then
        HEADER_LEN = FIXED_HEADER_LEN + 8
    end
    if len < HEADER_LEN then
        if len >= 5 then tree:add(F.version, tvb(4, 1)) end
        if len >= 6 then tree:add(F.kind, tvb(5, 1)) end
        if cut then
            tree:add(tvb(0, len), "[Header cut short by the capture length]")
            return "Trireme (cut by capture length)"
        end
        malformed(tree, string.format("header truncated: %d of %d bytes", len, HEADER_LEN))
        return "Trireme"
    end

    local version = tvb(4, 1):uint()
    local kind = tvb(5, 1):uint()
    local flags = tvb(6, 2):uint()
    local hdr = {
        request_id = tvb(16, 8):uint64(),
        transmission = tvb(24, 4):uint(),
        echo = tvb(28, 4):uint(),
        frag_index = tvb(32, 4):uint(),
        frag_count = tvb(36, 4):uint(),
        message_len = tvb(40, 4):uint(),
    }

    tree:add(F.version, tvb(4, 1))
    tree:add(F.kind, tvb(5, 1))
    local ft = tree:add(F.flags, tvb(6, 2))
    ft:add(F.flag_mac, tvb(6, 2))
    ft:add(F.flag_ackresp, tvb(6, 2))
    ft:add(F.flag_padded, tvb(6, 2))
    ft:add(F.flag_other, tvb(6, 2))
    tree:add(F.incarnation, tvb(8, 8))
    tree:add(F.request_id, tvb(16, 8))
    tree:add(F.transmission, tvb(24, 4))
    tree:add(F.echo, tvb(28, 4))
    local fi = tree:add(F.frag_index, tvb(32, 4))
    tree:add(F.frag_count, tvb(36, 4))
    local ml = tree:add(F.message_len, tvb(40, 4))
    tree:add(F.mac, tvb(44, 16))
    if HEADER_LEN > FIXED_HEADER_LEN then tree:add(F.stamp, tvb(60, 8)) end

    local kind_name = KIND_NAMES[kind] or ("Kind " .. kind)
    local head = kind_name .. " " .. tostring(hdr.request_id)
    local echo = hdr.echo ~= 0 and (" echo " .. hdr.echo) or ""
    local tx = " tx " .. hdr.transmission

    if version ~= VERSION then
        malformed(tree, "unsupported protocol version " .. version)
        return head
    end
    if not KIND_NAMES[kind] then
        malformed(tree, "unknown kind " .. kind)
        return head
    end
    local header_ok = true
    if hdr.frag_count == 0 or hdr.frag_index >= hdr.frag_count then
        malformed(fi, string.format("fragment %d of %d", hdr.frag_index, hdr.frag_count))
        header_ok = false
    elseif hdr.frag_count > max_fragments(hdr.message_len) then
        malformed(ml, string.format("%d fragments for a %d-byte message", hdr.frag_count, hdr.message_len))
        header_ok = false
    elseif hdr.message_len > MAX_MESSAGE then
        malformed(ml, string.format("message length %d exceeds %d", hdr.message_len, MAX_MESSAGE))
        header_ok = false
    end

    local payload_len = reported - HEADER_LEN -- the datagram's payload, captured or not
    local captured = len - HEADER_LEN
    if kind == 1 or kind == 2 then
        local frag = string.format(" frag %d/%d", hdr.frag_index + 1, hdr.frag_count)
        local pt
        if captured > 0 then pt = tree:add(F.payload, tvb(HEADER_LEN, captured)) end
        if not header_ok then return head .. frag .. tx .. echo end
        local expected = fragment_len(hdr.message_len, hdr.frag_count, hdr.frag_index)
        -- A padded one-fragment request: zeros follow the message.
        if has_bit(flags, 0x0004) and kind == 1 and hdr.frag_count == 1 and payload_len >= expected then
            payload_len = expected
            captured = math.min(captured, expected)
        end
        if payload_len ~= expected then
            malformed(pt or tree, string.format("fragment payload is %d bytes, expected %d", payload_len, expected))
        end
        if hdr.frag_index == 0 and hdr.message_len == 0 then
            malformed(ml, "empty message body")
        end
        local name, details
        if hdr.frag_index == 0 and captured > 0 then
            name, details = dissect_body(tvb, tree, kind, hdr, payload_len, cut)
        end
        local text = head
        if name then text = text .. " " .. name end
        text = text .. frag .. tx .. echo
        if details then text = text .. info_details(details) end
        return text
    elseif kind == 3 then
        local which = has_bit(flags, 0x0002) and " of response" or " of request"
        local text = head .. which .. tx .. echo
        if cut then
            tree:add(tvb(0, len), "[Ack body cut short by the capture length]")
            return text
        end
        return text .. dissect_ack(tvb, tree)
    else
        -- A retry carries a token; a probe is empty or echoes one.
        if payload_len > 0 then
            local pt = captured > 0 and tree:add(F.token, tvb(HEADER_LEN, captured)) or tree
            if payload_len ~= 20 then
                malformed(pt, string.format("%d-byte token, expected 20", payload_len))
            end
        elseif kind == 5 then
            malformed(tree, "retry without a token")
        end
        return head .. tx .. echo
    end
end

-- Dissects a bundle ("TRIB", version, then a 2-byte length and the bytes of each datagram):
-- each datagram as its own subtree; returns the Info texts joined by " | ".
local function dissect_bundle(tvb, pinfo, root)
    local len = tvb:len()
    local tree = root:add(trireme, tvb(), "Trireme bundle")
    if len < 5 then
        malformed(tree, "bundle header truncated")
        return "Trireme bundle"
    end
    if tvb(4, 1):uint() ~= VERSION then
        malformed(tree, "bundle of unsupported protocol version " .. tvb(4, 1):uint())
        return "Trireme bundle"
    end
    local infos = {}
    local pos = 5
    while pos < len do
        if pos + 2 > len then
            malformed(tree, "bundle length truncated")
            break
        end
        local part_len = tvb(pos, 2):uint()
        if part_len == 0 or pos + 2 + part_len > len then
            malformed(tree, string.format("bundled datagram of %d bytes at offset %d does not fit", part_len, pos))
            break
        end
        infos[#infos + 1] = dissect(tvb(pos + 2, part_len):tvb(), pinfo, tree)
        pos = pos + 2 + part_len
    end
    tree:append_text(string.format(" (%d datagrams)", #infos))
    return table.concat(infos, " | ")
end

-- The dissector proper (also what "Decode As" calls). No Lua error escapes it.
local function dissector(tvb, pinfo, root)
    notes = {}
    pinfo.cols.protocol:set("TRIREME")
    local entry = dissect
    if tvb:len() >= 4 and tvb(0, 4):raw() == "TRIB" then entry = dissect_bundle end
    local ok, result = pcall(entry, tvb, pinfo, root)
    local info
    if ok then
        info = result
    else
        root:add_proto_expert_info(E_INTERNAL, "Trireme dissector error: " .. tostring(result))
        info = "Trireme [dissector error]"
    end
    if #notes > 0 then info = info .. " [malformed: " .. table.concat(notes, "; ") .. "]" end
    pinfo.cols.info:set(info)
    return tvb:len()
end

-- Heuristic entry: the magic "TRIR", then protocol version 1 and a known kind; or a bundle:
-- "TRIB" and version 1.
local function heuristic(tvb, pinfo, root)
    if tvb:len() >= 5 and tvb(0, 4):raw() == "TRIB" and tvb(4, 1):uint() == VERSION then
        dissector(tvb, pinfo, root)
        return true
    end
    if tvb:len() < 6 then return false end
    if tvb(0, 4):raw() ~= "TRIR" then return false end
    if tvb(4, 1):uint() ~= VERSION then return false end
    local kind = tvb(5, 1):uint()
    if kind < 1 or kind > 5 then return false end
    dissector(tvb, pinfo, root)
    return true
end

-- (The heuristic calls the local function: reading `trireme.dissector` back yields a dissector
-- handle, and calling that would push the protocol onto the layer list a second time.)
trireme.dissector = dissector

trireme:register_heuristic("udp", heuristic)
DissectorTable.get("udp.port"):add_for_decode_as(trireme)
