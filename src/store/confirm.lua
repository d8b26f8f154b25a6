-- pgfresh: a sweep confirms entries that already hold exactly its render. KEYS are their ticket keys,
-- ARGV[1] the sweep page's render ticket, then for each key the ticket text the sweep read beside the
-- entry (empty: none). Each ticket still as read is raised to the page's ticket, as the full write
-- would, so that no render older than the page lands later; one that changed since (a write came in
-- between) is left for the full ticket-checked write. Returns per key 1 confirmed, 0 not.
-- Tickets stay decimal text, compared as such (see write.lua).
local ticket = ARGV[1]
local function newer(a, b)
    if #a ~= #b then
        return #a > #b
    end
    return a > b
end
local results = {}
for i = 1, #KEYS do
    local current = redis.pcall('GET', KEYS[i])
    local result = 0
    if type(current) ~= 'table' and (current or '') == ARGV[i + 1] then
        if current and (current == ticket or newer(current, ticket)) then
            result = 1
        else
            local set = redis.pcall('SET', KEYS[i], ticket, 'KEEPTTL')
            if not (type(set) == 'table' and set.err) then
                result = 1
            end
        end
    end
    results[#results + 1] = result
end
return results
