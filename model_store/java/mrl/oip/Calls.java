package mrl.oip;

import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

/**
 * Sends the calls of one method, in one class file, to a static method of ours with the same
 * stack shape: the constant pool gains a method reference and each call's 3-byte invoke
 * instruction becomes a 3-byte invokestatic of it, so nothing else in the class moves. Used by
 * {@link GreedyBatching} and {@link InlineSend}, each on one class of TorchServe 0.12.0.
 */
final class Calls {
    static final int INVOKEVIRTUAL = 0xb6;
    static final int INVOKESTATIC = 0xb8;

    private Calls() {}

    /**
     * {@code klass} with its {@code opcode} calls of {@code owner.name desc} rewritten into
     * invokestatic calls of {@code helper.helperName helperDesc}; IllegalStateException if it does
     * not hold exactly {@code sites} of them (another TorchServe: leave the class unpatched).
     */
    static byte[] redirect(byte[] klass, String target, String owner, String name, String desc, int opcode,
                           int sites, String helper, String helperName, String helperDesc) {
        ByteBuffer in = ByteBuffer.wrap(klass);
        in.position(8); // magic, minor, major
        int count = in.getShort() & 0xffff;
        int[] tag = new int[count];
        int[] a = new int[count];
        int[] b = new int[count];
        String[] utf8 = new String[count];
        for (int i = 1; i < count; i++) {
            tag[i] = in.get() & 0xff;
            switch (tag[i]) {
                case 1: {
                    byte[] s = new byte[in.getShort() & 0xffff];
                    in.get(s);
                    utf8[i] = new String(s, StandardCharsets.UTF_8); // modified UTF-8: ASCII here
                    break;
                }
                case 7: case 8: case 16: case 19: case 20:
                    a[i] = in.getShort() & 0xffff;
                    break;
                case 15:
                    in.get();
                    a[i] = in.getShort() & 0xffff;
                    break;
                case 3: case 4:
                    in.getInt();
                    break;
                case 5: case 6:
                    in.getLong();
                    i++; // an 8-byte constant takes two entries
                    break;
                case 9: case 10: case 11: case 12: case 17: case 18:
                    a[i] = in.getShort() & 0xffff;
                    b[i] = in.getShort() & 0xffff;
                    break;
                default:
                    throw new IllegalStateException("constant pool tag " + tag[i] + " at entry " + i);
            }
        }
        int poolEnd = in.position();
        int method = -1;
        for (int i = 1; i < count; i++) {
            if (tag[i] == 10 && owner.equals(utf8[a[a[i]]])
                    && name.equals(utf8[a[b[i]]]) && desc.equals(utf8[b[b[i]]])) {
                method = i;
            }
        }
        if (method < 0) {
            throw new IllegalStateException("no " + owner + "." + name + desc + " in " + target);
        }
        int ref = count + 5; // the Methodref appended below
        List<Integer> found = new ArrayList<>();
        for (int p = poolEnd; p + 2 < klass.length; p++) {
            if ((klass[p] & 0xff) == opcode && (klass[p + 1] & 0xff) == method >> 8
                    && (klass[p + 2] & 0xff) == (method & 0xff)) {
                found.add(p);
            }
        }
        if (found.size() != sites) {
            throw new IllegalStateException(target + " calls " + owner + "." + name + " in " + found.size()
                    + " places, not the " + sites + " of TorchServe 0.12.0");
        }
        try {
            ByteArrayOutputStream added = new ByteArrayOutputStream();
            DataOutputStream out = new DataOutputStream(added);
            out.writeByte(1);
            out.writeUTF(helper);                 // count
            out.writeByte(7);
            out.writeShort(count);                // count + 1: Class
            out.writeByte(1);
            out.writeUTF(helperName);             // count + 2
            out.writeByte(1);
            out.writeUTF(helperDesc);             // count + 3
            out.writeByte(12);
            out.writeShort(count + 2);
            out.writeShort(count + 3);            // count + 4: NameAndType
            out.writeByte(10);
            out.writeShort(count + 1);
            out.writeShort(count + 4);            // count + 5: Methodref
            out.flush();
            byte[] extra = added.toByteArray();
            byte[] patched = new byte[klass.length + extra.length];
            System.arraycopy(klass, 0, patched, 0, poolEnd);
            System.arraycopy(extra, 0, patched, poolEnd, extra.length);
            System.arraycopy(klass, poolEnd, patched, poolEnd + extra.length, klass.length - poolEnd);
            patched[8] = (byte) ((count + 6) >> 8);
            patched[9] = (byte) (count + 6);
            for (int p : found) {
                int q = p + extra.length;
                patched[q] = (byte) INVOKESTATIC;
                patched[q + 1] = (byte) (ref >> 8);
                patched[q + 2] = (byte) ref;
            }
            return patched;
        } catch (IOException e) {
            throw new IllegalStateException(e);
        }
    }
}
